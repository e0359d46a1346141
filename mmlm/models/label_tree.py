"""Token trie of candidate answers, scored in one causal-LM pass with tree attention.

Scoring N labels after a shared prompt naively costs N sequences. Labels also share tokens with
each other ("small red circle", "small red square", ...), so their inputs form a trie: every
distinct answer prefix is fed once, attending to the prompt and to its own ancestors only
(the masking used by tree-based speculative decoding). Positions are the prompt length plus the
token's depth, so each path sees exactly what it would see alone; the scores equal separate
scoring to float precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LabelTree:
    """The inputs of a group of answers (every token but each answer's last), as a trie.

    ``tokens[i]``, ``parents[i]`` (-1 for children of the prompt) and ``depths[i]`` describe node
    i; parents come before their children. ``paths[j]`` lists, for answer j's tokens 1.., the node
    whose output predicts it (token 0 is predicted by the prompt's last position).
    """

    answers: list[list[int]]
    tokens: list[int]
    parents: list[int]
    depths: list[int]
    paths: list[list[int]]

    @classmethod
    def build(cls, answers: list[list[int]]) -> "LabelTree":
        if any(len(ids) == 0 for ids in answers):
            raise ValueError("every answer needs at least one token")
        index: dict[tuple[int, int], int] = {}
        tokens, parents, depths, paths = [], [], [], []
        for ids in answers:
            parent, path = -1, []
            for depth, token in enumerate(ids[:-1]):
                key = (parent, token)
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(token), parents.append(parent), depths.append(depth)
                parent = index[key]
                path.append(parent)
            paths.append(path)
        return cls(answers, tokens, parents, depths, paths)

    def __len__(self) -> int:
        return len(self.tokens)

    def attention_mask(self, prompt_length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive [1, 1, nodes, prompt + nodes] mask: every node sees the prompt and its ancestors."""
        n = len(self.tokens)
        sees = torch.zeros(n, prompt_length + n, dtype=torch.bool)
        sees[:, :prompt_length] = True
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                sees[i] = sees[parent]
            sees[i, prompt_length + i] = True
        mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)
        return mask[None, None].to(device)

    def total_log_probs(self, first_logprobs: torch.Tensor, node_logprobs: torch.Tensor | None) -> torch.Tensor:
        """[batch, n_answers] log-probability of each whole answer (the sum over its tokens).

        ``first_logprobs``: [batch, vocab] at the prompt's last position; ``node_logprobs``:
        [batch, nodes, vocab] at the tree's nodes (None when the tree is empty: one-token answers).
        """
        device = first_logprobs.device
        first = torch.tensor([ids[0] for ids in self.answers], device=device)
        total = first_logprobs[:, first]
        rest = [(j, node, ids[t + 1]) for j, (ids, path) in enumerate(zip(self.answers, self.paths))
                for t, node in enumerate(path)]
        if rest:
            answer, node, target = torch.tensor(rest, device=device).unbind(1)
            picked = node_logprobs[:, node, target]  # [batch, pairs]
            total = total.index_add(1, answer, picked)
        return total


def chunk_answers(answers: list[list[int]], max_nodes: int) -> list[list[int]]:
    """Answer indices in groups whose tries have at most ``max_nodes`` nodes (a longer single answer
    gets a group of its own). Sorting by tokens first puts answers that share prefixes together."""
    order = sorted(range(len(answers)), key=lambda j: answers[j])
    groups: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for j in order:
        prefixes = {tuple(answers[j][:k]) for k in range(1, len(answers[j]))}
        if not groups or len(seen | prefixes) > max_nodes:
            groups.append([])
            seen = set()
        groups[-1].append(j)
        seen |= prefixes
    return groups
