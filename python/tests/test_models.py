"""lowbit.models: config, routing, decoding, files, QAT and the metrics, against exact references."""

import json

import numpy as np
import pytest
import torch

import lowbit
from lowbit import models
from lowbit.data import ANSWERS, SyntheticScenes
from lowbit.models import MultiTaskConfig, MultiTaskVLM

TINY = dict(width=32, depth=1, heads=2, decoder_depth=1, vqa_depth=1, embed_dim=16,
            text={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64})


@pytest.fixture(scope="module")
def tiny() -> MultiTaskVLM:
    torch.manual_seed(0)
    return MultiTaskVLM(MultiTaskConfig(**TINY)).eval()


def test_config_json_round_trip_and_validation():
    c = MultiTaskConfig(**TINY, patch_size=16, ocr_steps=3)
    back = MultiTaskConfig.from_json(c.to_json())
    assert back == c and back.grid == 4 and back.answers == ANSWERS
    assert json.loads(c.to_json())["text"]["vocab_size"] == c.vocab_size
    for bad in ({"patch_size": 7}, {"width": 31}, {"depth": 0}, {"heads": True}, {"layer_norm_eps": 0.0},
                {"answers": ()}):
        with pytest.raises(lowbit.LowbitValueError):
            MultiTaskConfig(**{**TINY, **bad})
    with pytest.raises(lowbit.LowbitValueError, match="unknown"):
        MultiTaskConfig.from_json('{"widht": 3}')


def test_forward_shapes_and_routing(tiny):
    c = tiny.config
    x = torch.rand(3, 3, 64, 64)
    ran = set()
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: ran.add(n.split(".")[0]))
             for n, m in tiny.named_modules() if n]
    try:
        assert tiny(x, "ocr").shape == (3, c.grid * c.ocr_steps, len(c.charset) + 1)
        assert ran == {"vision", "ocr_head"}
        ran.clear()
        ids, mask = tiny.encode_questions(["what color is the circle ?"] * 3)
        assert tiny(x, "vqa", ids, mask).shape == (3, len(ANSWERS))
        assert ran == {"vision", "vqa_head"}
        ran.clear()
        t, tm = tiny.encode_texts(["a red circle"] * 2)
        e = tiny(None, "text", t, tm)
        assert ran == {"retrieval"} and e.shape == (2, c.embed_dim)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    finally:
        for h in hooks:
            h.remove()
    assert tiny(x, "caption", torch.full((3, 5), c.bos_id)).shape == (3, 5, c.vocab_size)
    with pytest.raises(lowbit.LowbitValueError, match="task"):
        tiny(x, "detect")
    with pytest.raises(lowbit.LowbitValueError, match="images"):
        tiny(torch.rand(3, 3, 32, 32), "ocr")
    with pytest.raises(lowbit.LowbitValueError, match="exceed"):
        tiny(x, "caption", torch.zeros(3, c.max_caption_len + 1, dtype=torch.long))


def test_padding_does_not_change_vqa_or_text(tiny):
    x = torch.rand(2, 3, 64, 64)
    ids, mask = tiny.encode_questions(["what color is the circle ?", "how many shapes are there ?"])
    short = int(mask.sum(1).max())
    torch.testing.assert_close(tiny(x, "vqa", ids, mask), tiny(x, "vqa", ids[:, :short], mask[:, :short]))
    t, tm = tiny.encode_texts(["a red circle", "a blue square left of a red circle"])
    torch.testing.assert_close(tiny(None, "text", t, tm)[:1], tiny(None, "text", t[:1, :4], tm[:1, :4]))


def _fake_step(table):
    """A decoder step from a table {prefix tuple: log-probs}."""
    def step(rows, prefix):
        return torch.stack([table[tuple(p.tolist())] for p in prefix])
    return step


def test_beam_search_finds_what_greedy_misses():
    c = MultiTaskConfig(**TINY)
    v = c.vocab_size
    b, e = c.bos_id, c.eos_id

    def dist(**probs):
        p = torch.full((v,), 1e-9)
        for tok, q in probs.items():
            p[int(tok[1:])] = q
        return (p / p.sum()).log()

    # Greedy takes 10 (0.6) and then must pick from a flat distribution; beam 2 finds 11 -> 12 -> EOS.
    flat = dist(**{f"t{i}": 1.0 for i in range(6, 40)})
    table = {(b,): dist(t10=0.6, t11=0.4), (b, 10): flat, (b, 11): dist(t12=0.99, t6=0.01),
             (b, 11, 12): dist(**{f"t{e}": 0.99, "t7": 0.01})}
    for i in range(6, 40):
        table[(b, 10, i)] = dist(**{f"t{e}": 1.0})
    table[(b, 11, 6)] = dist(**{f"t{e}": 1.0})
    table[(b, 11, 12, 7)] = dist(**{f"t{e}": 1.0})
    greedy = models.modules._decode(_fake_step(table), 1, c, 5, 1)[0]
    assert greedy[0] == 10 and greedy[-1] == e
    assert models.modules._decode(_fake_step(table), 1, c, 5, 2)[0] == [11, 12, e]
    with pytest.raises(lowbit.LowbitValueError, match="beam"):
        models.modules._decode(_fake_step(table), 1, c, 5, 0)
    with pytest.raises(lowbit.LowbitValueError, match="max_len"):
        models.modules._decode(_fake_step(table), 1, c, c.max_caption_len + 1, 1)


def test_greedy_caption_is_the_argmax_chain(tiny):
    x = torch.rand(2, 3, 64, 64)
    c = tiny.config
    got = tiny.caption(x, max_len=6)
    for i in range(2):
        seq = [c.bos_id]
        for _ in range(6):
            nxt = int(tiny(x[i:i + 1], "caption", torch.tensor([seq]))[0, -1].argmax())
            seq.append(nxt)
            if nxt == c.eos_id:
                break
        assert got[i] == tiny.tokenizer.decode(seq)


def test_ctc_collapse():
    cs = "ABC"
    assert models.modules._ctc_string([0, 1, 1, 0, 1, 2, 2, 0, 3], cs) == "AABC"
    assert models.modules._ctc_string([0, 0, 0], cs) == ""
    assert models.modules._ctc_string([3, 3, 3], cs) == "C"


def test_save_load_round_trip_f32(tiny, tmp_path):
    p = tmp_path / "m.safetensors"
    info = models.save(tiny, p)
    assert info["bytes"] == p.stat().st_size
    meta = lowbit.checkpoint_metadata(p)
    assert MultiTaskConfig.from_json(meta[models.CONFIG_KEY]) == tiny.config
    back = models.load(p)
    for (k, a), (k2, b) in zip(tiny.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("weights", ["int8", "int4", "int2", "ternary"])
def test_quantized_files_store_what_the_layers_deploy(tiny, tmp_path, weights):
    f32, q = tmp_path / "f.safetensors", tmp_path / f"{weights}.safetensors"
    models.save(tiny, f32)
    models.save(tiny, q, weights=weights)
    stored = lowbit.load_quantized(q)
    linear = models.files._linear_weights(tiny)
    sd = tiny.state_dict()
    for name in linear:
        w = sd[name].numpy()
        t = stored[name]
        if weights == "ternary":
            codes, s = lowbit.bitnet.ternary_quantize(w)
            np.testing.assert_array_equal(t.int_repr(), codes)
            assert t.scales.item() == np.float32(s)
        else:
            ref = lowbit.quantize(w, models.files._spec(weights))
            np.testing.assert_array_equal(t.int_repr(), ref.int_repr())
    assert isinstance(stored["retrieval.text.embeddings.word_embeddings.weight"], lowbit.QuantizedTensor)
    norm = stored["vision.blocks.0.norm1.weight"]
    assert isinstance(norm, np.ndarray) and norm.dtype == np.float16
    np.testing.assert_array_equal(norm, sd["vision.blocks.0.norm1.weight"].numpy().astype(np.float16))
    meta = lowbit.checkpoint_metadata(q)
    assert meta["lowbit.weights"] == weights
    assert (weights == "ternary") == ("lowbit.ternary" in meta)
    if weights == "ternary":
        assert sorted(json.loads(meta["lowbit.ternary"])) == sorted(linear)
    # the torch model of the quantized file carries the deployed (dequantized) weights
    back = models.load(q)
    name = "vision.blocks.0.attn.q.weight"
    np.testing.assert_array_equal(back.state_dict()[name].numpy(), stored[name].dequantize())
    assert q.stat().st_size < f32.stat().st_size


def test_ternary_file_metadata_is_checked(tmp_path):
    w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 16)
    with pytest.raises(lowbit.LowbitValueError, match="ternary"):
        lowbit.save_checkpoint(tmp_path / "x.safetensors", {"w": lowbit.quantize(w, lowbit.QuantSpec(4))},
                               {"lowbit.ternary": '["w"]'})
    with pytest.raises(lowbit.LowbitValueError, match="not stored quantized"):
        lowbit.save_checkpoint(tmp_path / "x.safetensors", {"w": w}, {"lowbit.ternary": '["w"]'})
    with pytest.raises(lowbit.LowbitValueError, match="own"):
        lowbit.save_checkpoint(tmp_path / "x.safetensors", {"w": w}, {"lowbit.format": "x"})
    assert not (tmp_path / "x.safetensors").exists()


def test_load_refuses_foreign_files(tmp_path):
    p = tmp_path / "plain.safetensors"
    lowbit.save_checkpoint(p, {"w": np.ones(3, np.float32)})
    with pytest.raises(lowbit.LowbitValueError, match="multi-task"):
        models.load(p)


def test_qat_layers_use_the_deployed_weights_and_pass_gradients(tiny):
    from lowbit.torch import BitLinear

    for weights in ("int4", "int2", "ternary"):
        q = models.quantize_for_training(tiny, weights)
        lins = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
        assert lins and all(isinstance(m, BitLinear if weights == "ternary" else models.QATLinear) for m in lins)
        assert q.state_dict().keys() == tiny.state_dict().keys()
    q = models.quantize_for_training(tiny, "int4")
    lin = q.vision.blocks[0].mlp.fc1
    x = torch.randn(5, lin.in_features)
    wq = torch.from_numpy(lowbit.quantize(lin.weight.detach().numpy(), models.files._spec("int4")).dequantize())
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, wq, lin.bias), rtol=0, atol=0)
    lin(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad, torch.ones(lin.out_features, 5) @ x)


def test_training_lowers_the_loss():
    data = list(SyntheticScenes(seed=3, n=24))
    cfg = MultiTaskConfig(**TINY)
    torch.manual_seed(0)
    start = MultiTaskVLM(cfg)
    b = models.training._Batches(data, cfg)
    batch = b.sample(torch.arange(24), np.random.default_rng(0))
    with torch.no_grad():
        before = models.multitask_loss(start.eval(), batch)[0].item()
    trained = models.train(init=start, data=data, steps=40, batch_size=24, lr=3e-3, progress=False)
    with torch.no_grad():
        after = models.multitask_loss(trained.eval(), batch)[0].item()
    assert after < 0.8 * before


def test_qat_training_keeps_plain_linear_layers(tmp_path):
    data = list(SyntheticScenes(seed=4, n=8))
    start = MultiTaskVLM(MultiTaskConfig(**TINY))
    ck = tmp_path / "ck.safetensors"
    out = models.train(init=start, data=data, steps=2, batch_size=4, qat="ternary", checkpoint=ck, progress=False)
    assert all(type(m) is torch.nn.Linear for m in out.modules() if isinstance(m, torch.nn.Linear))
    assert models.load(ck).config == out.config


def test_evaluate_metrics_are_exact():
    items = list(SyntheticScenes(seed=5, n=10))
    uniq = sorted({s["caption"] for s in items})

    def onehot(c):
        return np.eye(len(uniq))[uniq.index(c)]

    class Perfect:
        """Answers from the ground truth of the chunk evaluate is on (it calls caption first)."""

        k = 0

        def caption(self, images, beam=1):
            self.chunk = items[self.k:self.k + len(images)]
            self.k += len(images)
            return [s["caption"] for s in self.chunk]

        def ocr(self, images):
            return [s["text"] for s in self.chunk]

        def vqa(self, images, questions):
            scenes = [next(s for s in self.chunk if np.array_equal(s["image"], im)) for im in images]
            return [dict(s["qa"])[q] for s, q in zip(scenes, questions)]

        def embed_images(self, images):
            return np.stack([onehot(s["caption"]) for s in self.chunk])

        def embed_texts(self, texts):
            return np.stack([onehot(t) for t in texts])

    m = models.evaluate(Perfect(), items, batch_size=4)
    assert m == {"caption_exact": 100.0, "ocr_char_acc": 100.0, "vqa_acc": 100.0, "retrieval_r1": 100.0}

    class Wrong(Perfect):
        def caption(self, images, beam=1):
            super().caption(images)
            return ["a red circle"] * len(images)

        def ocr(self, images):
            return [s["text"][:-1] + "#" for s in self.chunk]

        def vqa(self, images, questions):
            return ["red"] * len(questions)

        def embed_texts(self, texts):
            return np.zeros((len(texts), len(uniq)))

    w = models.evaluate(Wrong(), items, batch_size=4)
    assert w["caption_exact"] == 100 * sum(s["caption"] == "a red circle" for s in items) / 10
    assert w["ocr_char_acc"] == pytest.approx(100 * np.mean([1 - 1 / len(s["text"]) for s in items]))
    qa = [a for s in items for _, a in s["qa"]]
    assert w["vqa_acc"] == pytest.approx(100 * qa.count("red") / len(qa))
    # all-equal similarities: argmax picks the first caption
    assert w["retrieval_r1"] == 100 * sum(s["caption"] == uniq[0] for s in items) / 10
