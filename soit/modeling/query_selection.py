"""Which decoder queries start where: the two-stage proposals of the encoder tokens, the
top-scoring ones kept as queries, and the self-attention mask that keeps the query groups
apart (docs/model.md, section 2).

The modules with weights (the proposal projection, the box embedding, the learned queries)
belong to :class:`~soit.modeling.transformer.DeformableTransformer`; these functions are the
arithmetic around them.
"""
from typing import Sequence

import torch

from soit.layers.position_encoding import valid_extent

__all__ = ["TooFewTokensError", "encoder_proposals", "top_proposals", "query_group_mask"]


class TooFewTokensError(ValueError):
    """The encoder has fewer tokens than the two-stage selection needs queries."""


def encoder_proposals(masks: Sequence[torch.Tensor], padding_mask: torch.Tensor, proposal_size: float, size_scale=None):
    """One proposal box per encoder token (two-stage).

    Args:
        masks: L tensors (N, H_l, W_l) bool, True = pad.
        padding_mask: (N, S) bool, the masks flattened.
        proposal_size: width and height of the level-0 proposals (fraction of the valid
            image size), doubled per level.
        size_scale: None or (N, 2): the proposal sizes are divided by it, per axis
            (``SOIT(reference_size=...)``: the same size in pixels at any image size).

    Returns:
        invalid: (N, S, 1) bool: padding, or a proposal with any coordinate outside
            (0.01, 0.99).
        proposals: (N, S, 4) logit of (cx, cy, w, h): the token's pixel centre over the
            level's valid size, w = h = proposal_size * 2 ** level; +inf where invalid.
    """
    proposals = []
    device = padding_mask.device
    for lvl, m in enumerate(masks):
        h, w = m.shape[-2], m.shape[-1]
        ys = torch.arange(h, dtype=torch.float32, device=device)
        xs = torch.arange(w, dtype=torch.float32, device=device)
        grid = torch.stack([xs[None, :].expand(h, -1), ys[:, None].expand(-1, w)], -1)  # (h, w, 2)
        scale = valid_extent(m).view(-1, 1, 1, 2)
        centre = (grid[None] + 0.5) / scale  # (N, h, w, 2)
        wh = torch.full_like(centre, proposal_size * 2.0**lvl)
        if size_scale is not None:
            wh = wh / size_scale.view(-1, 1, 1, 2)
        proposals.append(torch.cat((centre, wh), -1).flatten(1, 2))
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    invalid = ~valid | padding_mask[..., None]
    # Plain logit: padded centres lie outside (0, 1) and give NaN, replaced by +inf here.
    return invalid, torch.log(proposals / (1 - proposals)).masked_fill(invalid, float("inf"))


def top_proposals(scores: torch.Tensor, boxes_unact: torch.Tensor, num_select: int, hint: str = ""):
    """(N, num_select, 4) boxes in sigmoid space of the ``num_select`` highest ``scores``
    (N, S) among ``boxes_unact`` (N, S, 4) (inverse-sigmoid space), detached: the decoder's
    starting point, not trained through it. Fewer tokens than ``num_select`` is a
    :class:`TooFewTokensError` (``hint`` names the setting that asks for them)."""
    if not torch.jit.is_tracing() and scores.shape[1] < num_select:
        raise TooFewTokensError(
            f"{scores.shape[1]} encoder tokens cannot give {num_select} proposals; use larger inputs or fewer "
            f"num_queries{hint}"
        )
    topk = torch.topk(scores, num_select, dim=1)[1]
    return torch.gather(boxes_unact, 1, topk[..., None].expand(-1, -1, 4)).detach().sigmoid()


def query_group_mask(num_total, num_dn, dn_groups, num_one2one, device=None):
    """(num_total, num_total) bool self-attention mask of the decoder's query groups, True
    where query i must not attend to query j. The queries are, in order: ``num_dn``
    denoising queries in ``dn_groups`` equal groups, ``num_one2one`` one-to-one queries, and
    the rest (the one-to-many group). Each group sees itself; a denoising group also sees
    the one-to-one queries (which see neither the denoising nor the one-to-many queries)."""
    index = torch.arange(num_total, device=device)
    group = torch.where(index < num_dn, index // max(num_dn // max(dn_groups, 1), 1), index.new_full((), -1))
    group = torch.where(index >= num_dn + num_one2one, index.new_full((), -2), group)
    one2one = (index >= num_dn) & (index < num_dn + num_one2one)
    allowed = (group[:, None] == group[None, :]) | ((index < num_dn)[:, None] & one2one[None, :])
    return ~allowed
