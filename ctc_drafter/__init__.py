"""ctc-drafter: lossless speculative decoding with a CTC-based draft model.

    from ctc_drafter import SpeculativeDecoder
    drafter = SpeculativeDecoder.from_pretrained("default", "default")
    out = drafter.chat("Name three colours.", max_new_tokens=64)
    print(out.text, out.mean_accept_length, out.tokens_per_s)
"""

from .decoding import CTCDrafter, GenerationResult, Proposer, SpeculativeDecoder, TokenTree
from .draft import CTCDraftModel, DraftConfig
from .errors import CTCDrafterError
from .models import load_base_model

__version__ = "0.1.0"
__all__ = ["SpeculativeDecoder", "CTCDrafter", "GenerationResult", "Proposer", "TokenTree", "CTCDraftModel", "DraftConfig", "CTCDrafterError", "load_base_model"]
