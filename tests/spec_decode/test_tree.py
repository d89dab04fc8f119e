"""DraftTree and pack_trees against a brute-force reading of the beams."""
import random

import pytest
import torch

from paraserve.spec_decode.tree import DraftTree, pack_trees


def random_beams(rng: random.Random, vocab: int = 3, max_w: int = 6, max_l: int = 4
                 ) -> list[list[int]]:
    # a small vocabulary makes shared prefixes and exact duplicate beams common
    return [[rng.randrange(vocab) for _ in range(rng.randint(0, max_l))]
            for _ in range(rng.randint(0, max_w))]


@pytest.mark.parametrize("seed", range(8))
def test_tree_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(25):
        beams = random_beams(rng)
        tree = DraftTree.from_beams(9, beams)
        tree.check_integrity()
        paths = [tree.path(i) for i in range(tree.num_nodes)]
        prefixes = {tuple(b[:l]) for b in beams for l in range(len(b) + 1)}
        assert len(set(paths)) == len(paths), "two nodes hold the same path"
        assert set(paths) == prefixes | {()}, "a prefix is missing or a node is spurious"
        assert paths[0] == () and int(tree.token_ids[0]) == 9
        assert tree.depths.tolist() == [len(p) for p in paths]
        for i, pi in enumerate(paths):
            for j, pj in enumerate(paths):
                assert bool(tree.attn_mask[i, j]) == (pi[:len(pj)] == pj), (i, j)
        for w, beam in enumerate(beams):
            for l in range(tree.unpack.shape[1]):
                assert bool(tree.unpack_valid[w, l]) == (l < len(beam))
                if l < len(beam):
                    assert paths[int(tree.unpack[w, l])] == tuple(beam[:l + 1])


def test_shared_prefixes_are_stored_once():
    tree = DraftTree.from_beams(0, [[1, 2, 3], [1, 2, 4], [1, 2, 3], [5]])
    tree.check_integrity()
    assert tree.token_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert tree.parents.tolist() == [0, 0, 1, 2, 2, 0]
    assert tree.depths.tolist() == [0, 1, 2, 3, 3, 1]
    assert tree.unpack.tolist() == [[1, 2, 3], [1, 2, 4], [1, 2, 3], [5, 0, 0]]
    assert tree.unpack_valid[3].tolist() == [True, False, False]


def test_empty_proposals():
    for beams in ([], [[]], [[], []]):
        tree = DraftTree.from_beams(4, beams)
        tree.check_integrity()
        assert tree.num_nodes == 1 and tree.attn_mask.tolist() == [[True]]


def test_check_integrity_catches_corruption():
    def fresh() -> DraftTree:
        return DraftTree.from_beams(0, [[1, 2], [1, 3], [4]])

    bad = fresh()
    bad.attn_mask[2, 1] = False
    bad2 = fresh()
    bad2.token_ids[2] = 3  # siblings 2 and 3 now carry the same token
    bad3 = fresh()
    bad3.unpack[1, 1] = 4  # beam 1 no longer follows a root path
    bad4 = fresh()
    bad4.depths[4] = 2
    for tree in (bad, bad2, bad3, bad4):
        with pytest.raises(AssertionError):
            tree.check_integrity()


@pytest.mark.parametrize("seed", range(4))
def test_pack_trees(seed):
    rng = random.Random(seed)
    trees = [DraftTree.from_beams(rng.randrange(3), random_beams(rng)) for _ in range(7)]
    packed = pack_trees(trees)
    sizes = [t.num_nodes for t in trees]
    assert packed.num_nodes == sizes
    assert packed.token_ids.tolist() == sum((t.token_ids.tolist() for t in trees), [])
    assert packed.depths.tolist() == sum((t.depths.tolist() for t in trees), [])
    # gathering the flat row ids back gives each tree's own node order
    rows = packed.gather(torch.arange(len(packed.token_ids)))  # [B, N]
    masks = packed.request_masks()
    for b, (t, n) in enumerate(zip(trees, sizes)):
        start = packed.query_start_loc[b]
        assert rows[b, :n].tolist() == list(range(start, start + n))
        assert torch.equal(packed.node_tokens[b, :n], t.token_ids)
        assert torch.equal(packed.node_parents[b, :n], t.parents)
        assert torch.equal(masks[b], t.attn_mask)
        # padding nodes are unreachable: no mask entry and no valid unpack entry
        assert not packed.attn_mask[b, n:].any() and not packed.attn_mask[b, :, n:].any()
        w, l = t.unpack.shape
        assert torch.equal(packed.unpack[b, :w, :l], t.unpack)
        assert torch.equal(packed.unpack_valid[b, :w, :l], t.unpack_valid)
        assert packed.unpack_valid[b].sum() == t.unpack_valid.sum()


@pytest.mark.parametrize("seed", range(4))
def test_prefix_is_the_tree_of_the_cut_beams(seed):
    """A step's budget may take only the first n nodes: they form the tree of the beams cut
    where they leave those nodes."""
    rng = random.Random(seed)
    for _ in range(25):
        beams = random_beams(rng)
        tree = DraftTree.from_beams(9, beams)
        for n in range(1, tree.num_nodes + 1):
            part = tree.prefix(n)
            part.check_integrity()
            cut = [[t for t, node in zip(b, tree.unpack[w].tolist()) if node < n] for w, b in enumerate(beams)]
            ref = DraftTree.from_beams(9, cut)
            assert torch.equal(part.token_ids, ref.token_ids) and torch.equal(part.parents, ref.parents)
            assert torch.equal(part.attn_mask, ref.attn_mask)
            assert torch.equal(part.unpack_valid[:, :ref.unpack.shape[1]], ref.unpack_valid)
