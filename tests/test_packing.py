"""Padded <-> packed conversions and next-token targets that never cross a sequence boundary."""
import torch

from deltal_kernels import packing


def test_pack_unpack_right_and_left_padding():
    ids = torch.tensor([[1, 2, 3, 0], [0, 0, 4, 5], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    packed = packing.pack(ids, mask)
    assert packed.values.tolist() == [1, 2, 3, 4, 5]
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 5]
    assert torch.equal(packing.unpack(packed.values, mask), ids * mask)


def test_pack_keeps_trailing_dims():
    logits = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    packed = packing.pack(logits, mask)
    assert packed.values.shape == (4, 4)
    assert torch.equal(packed.values[1], logits[0, 2])
    assert torch.equal(packing.unpack(packed.values, mask, fill=-1)[0, 1], torch.full((4,), -1))


def test_lengths_and_scored_lengths():
    cu = torch.tensor([0, 2, 2, 6], dtype=torch.int32)
    mask = torch.tensor([True, False, True, True, False, True])
    assert packing.lengths_from_cu_seqlens(cu).tolist() == [2, 0, 4]
    assert packing.scored_lengths(cu, mask).tolist() == [1, 0, 3]
    assert packing.scored_lengths(cu).tolist() == [2, 0, 4]
    assert packing.sequence_ids(cu, 6).tolist() == [0, 0, 2, 2, 2, 2]
    assert packing.cu_seqlens_from_lengths(torch.tensor([2, 0, 4])).tolist() == [0, 2, 2, 6]


def test_next_token_targets_stay_inside_each_sequence():
    ids = torch.tensor([10, 11, 12, 20, 30, 31])
    cu = torch.tensor([0, 3, 3, 4, 6])  # sequences [10 11 12], [], [20], [30 31]
    targets, valid = packing.next_token_targets(ids, cu, fill=0)
    assert targets.tolist() == [11, 12, 0, 0, 31, 0]
    assert valid.tolist() == [True, True, False, False, True, False]


def test_next_token_targets_empty_batch():
    targets, valid = packing.next_token_targets(torch.tensor([], dtype=torch.long), torch.tensor([0, 0]))
    assert targets.numel() == 0 and valid.numel() == 0
