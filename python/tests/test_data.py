"""lowbit.data: synthetic scenes are deterministic and their labels match the pixels."""

import numpy as np
import pytest

from lowbit.data import ANSWERS, CHARSET, COLORS, POSITIONS, SyntheticScenes, Tokenizer


def test_scenes_are_deterministic_and_indexable():
    a, b = SyntheticScenes(seed=5, n=20), SyntheticScenes(seed=5, n=20)
    for i in (0, 7, 19, -1):
        x, y = a[i], b[i]
        assert np.array_equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["qa"] == y["qa"]
    assert np.array_equal(a[-1]["image"], a[19]["image"])
    # Order of access does not matter, and another seed gives other scenes.
    assert a[3]["caption"] == SyntheticScenes(seed=5, n=20)[3]["caption"]
    c = SyntheticScenes(seed=6, n=20)
    assert not all(np.array_equal(a[i]["image"], c[i]["image"]) for i in range(5))
    with pytest.raises(IndexError):
        a[20]
    assert len(a) == 20 and len(list(a)) == 20


@pytest.mark.parametrize("size", [32, 64, 96])
def test_labels_match_the_pixels(size):
    ds = SyntheticScenes(seed=1, n=60, image_size=size)
    counts = set()
    for s in ds:
        img = s["image"]
        assert img.shape == (3, size, size) and img.dtype == np.float32 and img.flags.c_contiguous
        assert 0.0 <= img.min() and img.max() <= 1.0
        shapes = s["shapes"]
        counts.add(len(shapes))
        # Left to right, in distinct thirds, each centre pixel painted in its colour.
        assert [sh.slot for sh in shapes] == sorted({sh.slot for sh in shapes})
        for sh in shapes:
            assert sh.slot == min(2, sh.cx * 3 // size)
            rgb = np.round(img[:, sh.cy, sh.cx] * 255).astype(int)
            assert tuple(rgb) == COLORS[sh.color], (s["caption"], sh)
        words = s["caption"].split()
        assert [w for w in words if w in COLORS] == [sh.color for sh in shapes]
        # The text band has dark ink and the OCR string is in the charset.
        band = img[:, size - size // 3:, :]
        assert (band.max(axis=0) < 0.5).sum() >= 3 * len(s["text"])
        assert set(s["text"]) <= set(CHARSET) and 3 <= len(s["text"]) <= 5
        assert [CHARSET[i - 1] for i in s["text_ids"]] == list(s["text"])
        for q, a in s["qa"]:
            assert a in ANSWERS, (q, a)
            if q.startswith("how many"):
                assert a == ("one", "two", "three")[len(shapes) - 1]
            if q.startswith("where is"):
                color = q.split()[3]
                assert a == POSITIONS[next(sh.slot for sh in shapes if sh.color == color)]
            if q.startswith("what is the first character"):
                assert a == s["text"][0].lower()
    assert counts == {1, 2, 3}


def test_tokenizer_round_trip_and_batches():
    tok = Tokenizer()
    ds = SyntheticScenes(seed=2, n=30)
    for s in ds:
        for text in [s["caption"], *(q for q, _ in s["qa"]), *(a for _, a in s["qa"])]:
            ids = tok.encode(text, bos=True, eos=True)
            assert tok.unk not in ids, text
            assert tok.decode(ids) == text.replace("?", " ?")
    ids, mask = tok.batch([ds[0]["caption"], "a red circle"], max_len=5, bos=True)
    assert ids.dtype == np.int64 and ids.shape == (2, 5) and mask.tolist()[1] == [1, 1, 1, 1, 0]
    assert ids[0, 0] == tok.bos and tok.encode("zebra") == [tok.unk]
    with pytest.raises(ValueError):
        tok.batch(["a"], max_len=0)


@pytest.mark.parametrize("kwargs", [dict(n=-1), dict(image_size=16), dict(max_shapes=0), dict(max_shapes=4),
                                    dict(text_len=(0, 3)), dict(text_len=(4, 3))])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticScenes(**kwargs)


def test_works_with_a_torch_dataloader():
    torch = pytest.importorskip("torch")
    ds = SyntheticScenes(seed=0, n=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=lambda b: torch.stack(
        [torch.from_numpy(s["image"]) for s in b]))
    batches = list(loader)
    assert len(batches) == 2 and batches[0].shape == (4, 3, 64, 64)
    assert torch.equal(batches[1][0], torch.from_numpy(ds[4]["image"]))
