# repeat_proposer.py: put its folder on PYTHONPATH, then
#   ctc-drafter generate --proposer repeat_proposer:RepeatLast --prompt "Count: one one one"
from ctc_drafter import Proposer, SpeculativeDecoder, TokenTree


class RepeatLast(Proposer):
    """Guesses that the newest token repeats, up to 3 times."""

    name = "repeat"

    def propose(self, state, max_depth, budget):
        n = min(3, max_depth, budget - 1)  # at most `budget` nodes, root included; depth <= max_depth
        return TokenTree([state.root] * (n + 1), parents=list(range(-1, n)))  # a chain under the newest token


if __name__ == "__main__":
    decoder = SpeculativeDecoder.from_pretrained("default", None, proposer=RepeatLast())
    print(decoder.chat("Count: one one one", max_new_tokens=16).text)
