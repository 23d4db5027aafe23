"""Training: created adapters, exact gradients against PyTorch (float64), optimizers against
PyTorch's update rules and loss curve, finite differences on a quantized base, save/load."""

from __future__ import annotations

import numpy as np
import pytest

import gguf
import lugh
from conftest import assert_close, model, rel_err, stored

ALL_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture
def grads_ref(fixture_dir):
    return np.load(fixture_dir / "reference_grads.npz")


def copy_of_lora_all(inf, fixture_dir) -> lugh.LoRA:
    """A created adapter holding the weights of lora-all.gguf, set through the tensor views."""
    t = lugh.LoRA.create(inf.model, rank=4, alpha=8.0, targets=ALL_TARGETS)
    for tensor in gguf.GGUFReader(fixture_dir / "lora-all.gguf").tensors:
        name, half = tensor.name.rsplit(".", 1)
        t.get_weight_tensor(name, half[-1]).set_data(np.array(tensor.data))
    return t


def next_token_targets(tokens) -> list:
    return [int(t) for t in tokens[1:]] + [-100]


def test_create_shapes_order_and_a_new_adapter_changes_nothing(f32_inference, ref):
    m = f32_inference.model
    t = lugh.LoRA.create(m, rank=8, alpha=16.0, targets=("attn_v", "ffn_down"), seed=3)
    assert (t.format, t.trainable, t.rank(), t.alpha, t.scale) == ("trainable", True, 8, 16.0, 1.0)
    assert t.weight_names() == [
        name
        for layer in range(m.n_layer)
        for name in (stored(m, layer, "attn_v"), f"blk.{layer}.ffn_down.weight")
    ]
    v = stored(m, 0, "attn_v")
    params = t.trainable_parameters()
    assert [p.shape for p in params[:4]] == [
        [8, m.n_embd],
        [m.tensor_info(v)["shape"][0], 8],
        [8, m.n_ff],
        [m.n_embd, 8],
    ]
    a = params[0].numpy()
    bound = 1 / np.sqrt(m.n_embd)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound, (
        "Kaiming-uniform bound 1/sqrt(in)"
    )
    assert not params[1].numpy().any(), "B starts at zero"
    assert params[0].grad is None and params[0].requires_grad
    assert np.array_equal(
        f32_inference.forward_all(ref["tokens"], lora=t), f32_inference.forward_all(ref["tokens"])
    )
    same = lugh.LoRA.create(m, rank=8, alpha=16.0, targets=("attn_v", "ffn_down"), seed=3)
    assert np.array_equal(same.trainable_parameters()[0].numpy(), a)
    other = lugh.LoRA.create(m, rank=8, targets=("attn_v", "ffn_down"), seed=4)
    assert not np.array_equal(other.trainable_parameters()[0].numpy(), a)
    default = lugh.LoRA.create(m)
    assert (default.rank(), default.alpha) == (16, 32.0)
    assert default.weight_names()[0] == stored(m, 0, "attn_q")
    assert default.weight_names()[-1] == stored(m, m.n_layer - 1, "attn_v")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 257}, "rank"),
        (
            {"targets": ("attn_q", "lm_head")},
            "attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down",
        ),
        ({"targets": ()}, "targets"),
        ({"targets": ("attn_q", "attn_q")}, "twice"),
    ],
)
def test_create_refuses_bad_arguments(f32_inference, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lugh.LoRA.create(f32_inference.model, **kwargs)


def test_tensors_are_views_of_the_adapter(f32_inference, ref, fixture_dir):
    t = copy_of_lora_all(f32_inference, fixture_dir)
    assert_close(
        f32_inference.forward_all(ref["tokens"], lora=t),
        ref["all_scale1.0"],
        1e-4,
        "copied weights",
    )
    q = stored(f32_inference.model, 0, "attn_q")
    b = t.get_weight_tensor(q, "B")
    values = b.numpy()
    values[:] = 0  # a copy: the adapter does not change
    assert b.numpy().any()
    b.set_data(np.zeros_like(values))
    assert not t.get_weight_tensor(q, "b").numpy().any()
    with pytest.raises(ValueError, match="shape"):
        b.set_data(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="no pair on"):
        t.get_weight_tensor("blk.0.ffn_norm.weight", "a")
    with pytest.raises(ValueError, match='"a" or "b"'):
        t.get_weight_tensor(q, "c")


def test_loaded_adapters_are_not_trainable_but_copies_are(f32_inference, ref, fixture_dir):
    loaded = lugh.LoRA(fixture_dir / "lora-all-peft", f32_inference.model, scale=0.5)
    with pytest.raises(ValueError, match="trainable_copy"):
        loaded.get_weight_tensor("blk.0.attn_q.weight", "a")
    with pytest.raises(ValueError, match="trainable_copy"):
        loaded.trainable_parameters()
    copy = loaded.trainable_copy()
    assert (copy.trainable, copy.format, copy.alpha, copy.scale) == (True, "trainable", 8.0, 0.5)
    assert_close(
        f32_inference.forward_all(ref["tokens"], lora=copy),
        ref["all_scale0.5"],
        1e-4,
        "trainable copy",
    )


def test_gradients_equal_pytorch(f32_inference, ref, grads_ref, fixture_dir):
    t = copy_of_lora_all(f32_inference, fixture_dir)
    tokens = ref["tokens"]
    logits = lugh.train.forward(f32_inference, tokens, t)
    assert logits.shape == [len(tokens), f32_inference.n_vocab]
    assert_close(logits.numpy(), ref["all_scale1.0"], 1e-4, "training forward logits")
    loss = lugh.train.cross_entropy_loss(logits, next_token_targets(tokens))
    assert loss.item() == pytest.approx(float(grads_ref["loss"]), rel=1e-5)
    loss.backward()
    params = t.trainable_parameters()
    assert len(params) == len(grads_ref.files) - 3  # every A and B; loss, train tokens, curve
    for p in params:
        name = repr(p).split("'")[1]
        assert_close(p.grad, grads_ref[name], 1e-4, f"dL/d{name}")
    with pytest.raises(RuntimeError, match="already ran"):
        loss.backward()


def test_fused_step_checkpointing_and_accumulation_give_the_same_gradients(
    f32_inference, ref, grads_ref, fixture_dir
):
    tokens = ref["tokens"].tolist()
    reference = copy_of_lora_all(f32_inference, fixture_dir)
    lugh.train.cross_entropy_loss(
        lugh.train.forward(f32_inference, tokens, reference), next_token_targets(tokens)
    ).backward()
    expected = [p.grad for p in reference.trainable_parameters()]
    for checkpoint in (False, True):
        t = copy_of_lora_all(f32_inference, fixture_dir)
        loss_sum, n = lugh.train.train_step(f32_inference, [tokens], t, checkpoint=checkpoint)
        assert n == len(tokens) - 1
        assert loss_sum / n == pytest.approx(float(grads_ref["loss"]), rel=1e-5)
        for p, e in zip(t.trainable_parameters(), expected):
            assert_close(p.grad, e, 1e-5, f"fused step (checkpoint={checkpoint})")
    # Two backward passes accumulate; zero_grad clears.
    t = copy_of_lora_all(f32_inference, fixture_dir)
    for _ in range(2):
        lugh.train.train_step(f32_inference, [tokens], t)
    for p, e in zip(t.trainable_parameters(), expected):
        assert_close(p.grad, 2 * e, 1e-5, "accumulated gradient")
    t.zero_grad()
    assert all(p.grad is None for p in t.trainable_parameters())


def peft_subset(fixture_dir, out, keep) -> str:
    """lora-all-peft with only the pairs for which `keep(layer, module, top)` holds (`top`: the
    adapter's last layer, `module` such as `self_attn.q_proj`)."""
    from safetensors.numpy import load_file, save_file

    src = fixture_dir / "lora-all-peft"
    out.mkdir()
    (out / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    where = {k: k.split("layers.")[1].split(".lora_")[0].split(".", 1) for k in tensors}
    top = max(int(layer) for layer, _ in where.values())
    kept = {k: v for k, v in tensors.items() if keep(int(where[k][0]), where[k][1], top)}
    assert kept, "the case keeps some pair"
    save_file(kept, out / "adapter_model.safetensors")
    return str(out)


# Which pairs of lora-all an adapter keeps (fused projections count as their parts).
SUBSETS = {
    "top-layer": lambda il, m, top: il == top,
    "down": lambda il, m, top: il == top and m.endswith("down_proj"),
    "up-o": lambda il, m, top: il == top and m.endswith(("up_proj", "o_proj")),
    "k": lambda il, m, top: il == top and m.endswith(("k_proj", "qkv_proj")),
    "v-gate": lambda il, m, top: (
        (il == top - 1 and m.endswith(("v_proj", "qkv_proj")))
        or (il == top and m.endswith(("gate_proj", "gate_up_proj")))
    ),
}


@pytest.mark.parametrize("subset", SUBSETS)
def test_an_adapter_on_some_layers_gets_the_gradients_of_a_full_one(
    f32_inference, ref, fixture_dir, tmp_path, subset
):
    """Nothing below an adapter's lowest trainable term is back-propagated (as with autograd);
    its gradients are those it has inside lora-all with every other B zero, which runs the
    whole backward."""
    tokens = ref["tokens"].tolist()
    path = peft_subset(fixture_dir, tmp_path / "subset", SUBSETS[subset])
    part = lugh.LoRA(path, f32_inference.model).trainable_copy()
    kept = {repr(p).split("'")[1] for p in part.trainable_parameters()}
    full = copy_of_lora_all(f32_inference, fixture_dir)
    for p in full.trainable_parameters():
        name = repr(p).split("'")[1]
        if name.endswith(".lora_b") and name not in kept:
            full.get_weight_tensor(name.removesuffix(".lora_b"), "b").set_data(
                np.zeros_like(p.numpy())
            )
    for adapter in (full, part):
        lugh.train.train_step(f32_inference, [tokens], adapter)
    expected = {repr(p).split("'")[1]: p.grad for p in full.trainable_parameters()}
    for p in part.trainable_parameters():
        name = repr(p).split("'")[1]
        assert np.abs(p.grad).max() > 0, f"dL/d{name} is zero"
        assert_close(p.grad, expected[name], 1e-6, f"dL/d{name}")


# precision="bf16" against the exact float64 references. PyTorch's bf16 autocast (transformers +
# PEFT on tiny-llama) is 2.5e-2 from them in the logits and 4.9e-2 in the adapter gradients;
# lugh's mode, which keeps the products' sums in f32, must be as close.
BF16_LOGITS_TOL = 3e-2
BF16_GRADS_TOL = 5e-2


def test_bf16_training_is_as_close_to_exact_as_pytorch_autocast(
    f32_inference, ref, grads_ref, fixture_dir
):
    tokens = ref["tokens"].tolist()
    t = copy_of_lora_all(f32_inference, fixture_dir)
    logits = lugh.train.forward(f32_inference, tokens, t, precision="bf16")
    assert_close(logits.numpy(), ref["all_scale1.0"], BF16_LOGITS_TOL, "bf16 logits")
    exact = lugh.train.forward(f32_inference, tokens, copy_of_lora_all(f32_inference, fixture_dir))
    assert rel_err(logits.numpy(), exact.numpy()) > 1e-4, "bf16 mode computed exact logits"
    loss = lugh.train.cross_entropy_loss(logits, next_token_targets(tokens))
    assert loss.item() == pytest.approx(float(grads_ref["loss"]), rel=1e-2)
    loss.backward()
    grads = [p.grad for p in t.trainable_parameters()]
    for p, g in zip(t.trainable_parameters(), grads):
        name = repr(p).split("'")[1]
        assert_close(g, grads_ref[name], BF16_GRADS_TOL, f"bf16 dL/d{name}")
    # The fused step, checkpointed or not, computes the same bf16 gradients, but for roundings:
    # a last-bit difference in an f32 operand (the fused loss computes dL/dlogits on the
    # device) can move its bf16 rounding by one bf16 step, 2^-8.
    for checkpoint in (False, True):
        fused = copy_of_lora_all(f32_inference, fixture_dir)
        lugh.train.train_step(
            f32_inference, [tokens], fused, checkpoint=checkpoint, precision="bf16"
        )
        for p, g in zip(fused.trainable_parameters(), grads):
            assert_close(p.grad, g, 1e-2, f"bf16 fused step (checkpoint={checkpoint})")


def test_memory_kept_from_an_earlier_step_changes_no_gradient(f32_inference, ref, fixture_dir):
    """An inference keeps the last step's activation memory for the next one: a step after a
    larger batch, or after a checkpointed one, must still give a fresh inference's result."""
    tokens = ref["tokens"].tolist()

    def grads(inf, **kwargs):
        t = copy_of_lora_all(inf, fixture_dir)
        lugh.train.train_step(inf, [tokens], t, **kwargs)
        return [p.grad for p in t.trainable_parameters()]

    fresh = grads(lugh.Inference(f32_inference.model, n_threads=2))
    inf = lugh.Inference(f32_inference.model, n_threads=2)
    t = copy_of_lora_all(inf, fixture_dir)
    lugh.train.train_step(inf, [ref[f"batch_tokens_{i}"].tolist() for i in range(3)], t)
    for kwargs in ({}, {"checkpoint": True}, {}):
        for g, e in zip(grads(inf, **kwargs), fresh):
            assert_close(g, e, 1e-6, f"step after an earlier one ({kwargs})")


def test_a_batch_of_different_lengths_averages_over_its_tokens(f32_inference, ref, fixture_dir):
    seqs = [ref[f"batch_tokens_{i}"].tolist() for i in range(3)]
    single = []
    for s in seqs:
        t = copy_of_lora_all(f32_inference, fixture_dir)
        lugh.train.train_step(f32_inference, [s], t)
        single.append([p.grad * (len(s) - 1) for p in t.trainable_parameters()])
    t = copy_of_lora_all(f32_inference, fixture_dir)
    logits = lugh.train.forward(f32_inference, seqs, t)
    targets = [x for s in seqs for x in next_token_targets(s)]
    lugh.train.cross_entropy_loss(logits, targets).backward()
    n = sum(len(s) - 1 for s in seqs)
    for i, p in enumerate(t.trainable_parameters()):
        assert_close(p.grad, sum(g[i] for g in single) / n, 1e-5, "batch gradient")


def test_adamw_reproduces_the_pytorch_loss_curve(f32_inference, grads_ref, fixture_dir):
    t = lugh.LoRA(fixture_dir / "lora-all.gguf", f32_inference.model).trainable_copy()
    opt = lugh.optim.AdamW(
        t.trainable_parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    tokens = grads_ref["train_tokens"]
    curve = []
    for _ in range(20):
        opt.zero_grad()
        loss = lugh.train.cross_entropy_loss(
            lugh.train.forward(f32_inference, tokens, t), next_token_targets(tokens)
        )
        curve.append(loss.item())
        loss.backward()
        opt.step()
    reference = grads_ref["train_curve_adamw_lr1e-2"]
    worst = float(np.max(np.abs(np.array(curve) - reference) / reference))
    assert worst < 1e-3, f"loss curve differs by {worst:.2e} relative (tolerance 1e-3)"


def test_finite_differences_on_a_quantized_base(fixture_dir, ref, device):
    """Central differences of the exact (f32) training loss on a q8_0 base, for the weights
    with the largest gradients."""
    inf = lugh.Inference(model(fixture_dir / "base-q8_0.gguf"), device=device)
    t = lugh.LoRA.create(inf.model, rank=2, alpha=4.0, targets=("attn_q", "ffn_down"), seed=1)
    rng = np.random.default_rng(0)
    for p in t.trainable_parameters()[1::2]:
        p.set_data(rng.normal(0, 0.05, p.shape).astype(np.float32))
    tokens = ref["tokens"].tolist()
    lugh.train.train_step(inf, [tokens], t)
    checked = 0
    for p in t.trainable_parameters()[:4]:
        grad = p.grad
        for flat in np.argsort(-np.abs(grad), axis=None)[:2]:
            index = np.unravel_index(flat, grad.shape)
            values = p.numpy()
            losses = []
            for delta in (1e-2, -1e-2):
                shifted = values.copy()
                shifted[index] += delta
                p.set_data(shifted)
                loss_sum, n = lugh.train.eval_loss(inf, [tokens], t)
                losses.append(loss_sum / n)
            p.set_data(values)
            numeric = (losses[0] - losses[1]) / 2e-2
            assert numeric == pytest.approx(grad[index], rel=2e-2), f"{p}{index}"
            checked += 1
    assert checked == 8


def test_sgd_follows_pytorch_rules(f32_inference, ref, fixture_dir):
    tokens = ref["tokens"].tolist()
    for momentum, nesterov, wd in ((0.0, False, 0.0), (0.9, False, 0.01), (0.9, True, 0.0)):
        t = copy_of_lora_all(f32_inference, fixture_dir)
        params = t.trainable_parameters()
        opt = lugh.optim.SGD(params, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
        expected = [p.numpy().astype(np.float64) for p in params]
        buffers = [None] * len(params)
        for _ in range(2):
            opt.zero_grad()
            lugh.train.train_step(f32_inference, [tokens], t)
            grads = [p.grad.astype(np.float64) for p in params]
            for i, g in enumerate(grads):
                d = g + wd * expected[i]
                if momentum:
                    buffers[i] = d if buffers[i] is None else momentum * buffers[i] + d
                    d = d + momentum * buffers[i] if nesterov else buffers[i]
                expected[i] = expected[i] - 0.1 * d
            opt.step()
            for p, e in zip(params, expected):
                assert_close(p.numpy(), e, 1e-5, f"SGD momentum={momentum} nesterov={nesterov}")
    with pytest.raises(ValueError, match="momentum"):
        lugh.optim.SGD(params, nesterov=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda params, lr: lugh.optim.AdamW(params, lr=lr),
        lambda params, lr: lugh.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    ],
    ids=["adamw", "sgd"],
)
def test_optimizer_state_resumes_training(f32_inference, ref, fixture_dir, make):
    tokens = ref["tokens"].tolist()

    def run(t, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            lugh.train.train_step(f32_inference, [tokens], t)
            opt.step()

    straight = copy_of_lora_all(f32_inference, fixture_dir)
    run(straight, make(straight.trainable_parameters(), 1e-2), 4)

    first = copy_of_lora_all(f32_inference, fixture_dir)
    opt1 = make(first.trainable_parameters(), 1e-2)
    assert isinstance(opt1, lugh.optim.Optimizer)
    run(first, opt1, 2)
    state = opt1.state_dict()
    resumed = first.trainable_copy()
    opt2 = make(resumed.trainable_parameters(), 5.0)
    opt2.load_state_dict(state)
    assert opt2.lr == pytest.approx(1e-2)
    run(resumed, opt2, 2)
    for a, b in zip(resumed.trainable_parameters(), straight.trainable_parameters()):
        assert_close(a.numpy(), b.numpy(), 1e-6, "resumed optimizer")
    with pytest.raises(ValueError, match="parameters"):
        make(resumed.trainable_parameters()[:2], 1e-2).load_state_dict(state)


def test_clipping(f32_inference, ref, fixture_dir):
    t = copy_of_lora_all(f32_inference, fixture_dir)
    lugh.train.train_step(f32_inference, [ref["tokens"].tolist()], t)
    params = t.trainable_parameters()
    norm = float(np.sqrt(sum((p.grad.astype(np.float64) ** 2).sum() for p in params)))
    assert lugh.optim.clip_grad_norm(params, norm / 2) == pytest.approx(norm, rel=1e-5)
    clipped = float(np.sqrt(sum((p.grad.astype(np.float64) ** 2).sum() for p in params)))
    assert clipped == pytest.approx(norm / 2, rel=1e-4)
    lugh.optim.clip_grad_value(params, 1e-4)
    assert max(np.abs(p.grad).max() for p in params) <= 1e-4


def test_lr_schedules():
    class Opt:
        lr = 1.0

    def lrs(**kw):
        s = lugh.optim.LRScheduler(Opt(), **kw)
        return [s.lr_at(i) for i in range(5)]

    assert lrs(schedule="constant") == [1.0] * 5
    assert lrs(schedule="linear", total_steps=4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lrs(schedule="cosine", total_steps=4, min_lr=0.5)[2] == pytest.approx(0.75)
    assert lrs(schedule="warmup", warmup_steps=2) == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert lrs(schedule="step", step_size=2, gamma=0.5) == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert lrs(schedule="exponential", gamma=0.5)[3] == 0.125
    opt = Opt()
    s = lugh.optim.LRScheduler(opt, schedule="linear", total_steps=4)
    s.step()
    assert opt.lr == 0.75
    with pytest.raises(ValueError, match="schedule"):
        lugh.optim.LRScheduler(Opt(), schedule="sawtooth")


def test_save_and_load_give_identical_logits(tmp_path, f32_inference, ref):
    t = lugh.LoRA.create(f32_inference.model, rank=4, targets=ALL_TARGETS, seed=5)
    for p in t.trainable_parameters()[1::2]:
        p.set_data(np.full(p.shape, 0.01, np.float32))
    expected = f32_inference.forward_all(ref["tokens"], lora=t)
    t.save(tmp_path / "t.gguf")
    t.save_peft(tmp_path / "peft")
    for path in (tmp_path / "t.gguf", tmp_path / "peft"):
        again = lugh.LoRA(path, f32_inference.model)
        assert np.array_equal(f32_inference.forward_all(ref["tokens"], lora=again), expected), (
            path.name
        )


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_trainer_lowers_the_loss(f32_inference, ref, precision):
    t = lugh.LoRA.create(f32_inference.model, rank=4, targets=("attn_q", "attn_v"), seed=0)
    data = [ref[f"batch_tokens_{i}"].tolist() for i in range(3)] + [ref["tokens"].tolist()]
    trainer = lugh.train.Trainer(
        f32_inference, t, lr=1e-2, batch_size=2, seq_len=16, grad_accum=2, precision=precision
    )
    before = trainer.evaluate(data)
    seen = []
    reports = trainer.fit(data, steps=8, eval_data=data, eval_every=4, callback=seen.append)
    assert len(reports) == 8 and seen == reports
    assert reports[-1].eval_loss < before
    assert reports[3].eval_loss is not None and reports[2].eval_loss is None
    assert all(r.tokens_per_s > 0 for r in reports)
    stopped = trainer.fit(data, steps=5, callback=lambda r: r.step == 2)
    assert len(stopped) == 2


def test_training_arguments_are_checked(f32_inference, fixture_dir, ref):
    t = lugh.LoRA.create(f32_inference.model, rank=2)
    tokens = ref["tokens"].tolist()
    logits = lugh.train.forward(f32_inference, tokens, t)
    with pytest.raises(ValueError, match="one target"):
        lugh.train.cross_entropy_loss(logits, tokens[1:])
    with pytest.raises(IndexError, match="out of range"):
        lugh.train.cross_entropy_loss(logits, [5000] * len(tokens))
    with pytest.raises(ValueError, match="masked"):
        lugh.train.cross_entropy_loss(logits, [-100] * len(tokens))
    with pytest.raises(TypeError, match="lugh.train.forward"):
        lugh.train.cross_entropy_loss(t.trainable_parameters()[0], [1])
    for bad in ("fp16", "BF16", ""):
        with pytest.raises(ValueError, match="precision"):
            lugh.train.forward(f32_inference, tokens, t, precision=bad)
        with pytest.raises(ValueError, match="precision"):
            lugh.train.train_step(f32_inference, [tokens], t, precision=bad)
        with pytest.raises(ValueError, match="precision"):
            lugh.train.Trainer(f32_inference, t, precision=bad)
    loaded = lugh.LoRA(fixture_dir / "lora-qv.gguf", f32_inference.model)
    with pytest.raises(ValueError, match="not trainable"):
        lugh.train.Trainer(f32_inference, loaded)
