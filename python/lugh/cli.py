"""The `lugh` command line: info, generate, chat, finetune, convert, merge, serve and demo."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import lugh
from lugh import demo
from lugh.chat import ChatSession

TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


# --- info -----------------------------------------------------------------------------------


DEVICE_HELP = "where to run: cpu (default), candle-cpu, cuda[:N], metal[:N] (see lugh.devices())"


def kv(m, key: str, default=None):
    """A metadata value of `m`, or `default` when the file lacks the key."""
    return m.get_kv(key) if key in m.kv_keys() else default


def describe_adapter(m) -> None:
    """Type, alpha, and rank and targets per layer, from an adapter's tensors."""
    print(f"type          {kv(m, 'adapter.type', '?')} adapter (general.type = adapter)")
    print(f"alpha         {kv(m, 'adapter.lora.alpha', 'none (llama.cpp: scale alone)')}")
    layers: dict = {}
    for name in m.tensor_names():
        if not name.endswith(".lora_a") or not name.startswith("blk."):
            continue
        _, layer, target = name.split(".")[:3]
        layers.setdefault(int(layer), []).append(f"{target} r{m.tensor_info(name)['shape'][0]}")
    print(f"layers        {len(layers)} adapted")
    for layer in sorted(layers):
        print(f"  blk.{layer:<3}    {', '.join(layers[layer])}")


def describe_tokenizer(m) -> None:
    """The vocabulary a GGUF carries."""
    model = kv(m, "tokenizer.ggml.model", "no")
    pre = kv(m, "tokenizer.ggml.pre")
    print(f"vocabulary    {m.n_vocab} tokens ({model} tokenizer{f', pre {pre}' if pre else ''})")
    specials = [
        f"{name} {kv(m, f'tokenizer.ggml.{name}_token_id')}"
        for name in ("bos", "eos", "unk", "pad")
        if kv(m, f"tokenizer.ggml.{name}_token_id") is not None
    ]
    if specials:
        print(f"special ids   {', '.join(specials)}")
    has_template = "tokenizer.chat_template" in m.kv_keys()
    print(f"chat template {'yes' if has_template else 'no'}")


def describe_attention(m) -> None:
    """What changes the attention or the logits beyond the LLaMA recipe: sliding windows,
    soft-caps (Gemma), LongRoPE (Phi-3)."""
    arch = m.architecture
    extras = []
    window = kv(m, f"{arch}.attention.sliding_window")
    if window:
        extras.append(f"sliding window {window}")
    for key, what in (
        ("attn_logit_softcapping", "score cap"),
        ("final_logit_softcapping", "logit cap"),
    ):
        if kv(m, f"{arch}.{key}"):
            extras.append(f"{what} {kv(m, f'{arch}.{key}'):g}")
    if "rope_factors_long.weight" in m.tensor_names():
        extras.append(f"LongRoPE from {kv(m, f'{arch}.rope.scaling.original_context_length')}")
    if extras:
        print(f"attention     {', '.join(extras)}")


def cmd_info(args) -> int:
    m = lugh.Model(args.model)
    print(f"file          {m.filename}")
    print(f"architecture  {m.architecture}")
    if kv(m, "general.type") == "adapter":
        describe_adapter(m)
    else:
        describe_tokenizer(m)
    if m.n_layer is not None:
        print(f"layers        {m.n_layer}, width {m.n_embd}, feed-forward {m.n_ff}")
        print(f"heads         {m.n_head} query, {m.n_head_kv} key/value, {m.head_dim} per head")
        print(
            f"context       {m.n_ctx_train} (RoPE base {m.rope_freq_base:g}), RMS eps {m.rms_eps:g}"
        )
        describe_attention(m)
    infos = [(name, m.tensor_info(name)) for name in m.tensor_names()]
    total = sum(info["n_bytes"] for _, info in infos)
    print(f"tensors       {len(infos)}, {human_bytes(total)}; metadata keys {m.n_kv}")
    if infos:
        width = max(len(name) for name, _ in infos)
        print()
        print(f"{'tensor':<{width}}  {'type':<5}  {'shape':<14}  size")
        for name, info in infos:
            shape = "x".join(str(d) for d in info["shape"])
            print(
                f"{name:<{width}}  {info['type']:<5}  {shape:<14}  {human_bytes(info['n_bytes'])}"
            )
    return 0


# --- generate -------------------------------------------------------------------------------


def load_loras(
    model, paths: Sequence[str], scales: Sequence[float], dtype: str | None = None
) -> list:
    if len(scales) > len(paths):
        raise ValueError(f"{len(scales)} --lora-scale values for {len(paths)} --lora adapters")
    scales = list(scales) + [1.0] * (len(paths) - len(scales))
    return [lugh.LoRA(path, model, scale=scale, dtype=dtype) for path, scale in zip(paths, scales)]


def stream_text(tokenizer, prompt: list, tokens) -> None:
    """Prints tokens as they come. The text is decoded with the prompt in front (so that
    word-initial spaces survive) and printed once characters split across byte tokens are
    complete."""
    ids = list(prompt)
    printed = tokenizer.decode(ids)
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text
    print()


def open_inference(args) -> tuple:
    """The model, its inference and the adapters `generate` and `chat` run with."""
    m = lugh.Model(args.model)
    inf = lugh.Inference(m, n_ctx=args.ctx, n_threads=args.threads, device=args.device)
    return m, inf, load_loras(m, args.lora or [], args.lora_scale or [], args.lora_dtype)


def chat_session(args) -> tuple:
    """The session `generate --chat` and `chat` talk through, and the opening messages."""
    m, inf, loras = open_inference(args)
    template = Path(args.chat_template).read_text() if args.chat_template else None
    session = ChatSession(inf, lugh.Tokenizer(m), template=template, lora=loras or None)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return session, messages


def answer(session: ChatSession, messages: list, args) -> str:
    """Streams the assistant's answer to stdout; returns it."""

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    reply = session.reply(
        messages,
        max_tokens=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        on_text=show,
    )
    print()
    return reply


def cmd_chat(args) -> int:
    session, messages = chat_session(args)
    print("lugh chat: an empty line or /exit ends the conversation", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("", "/exit", "/quit"):
            break
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": answer(session, messages, args)})
    return 0


def cmd_generate(args) -> int:
    if args.chat:
        session, messages = chat_session(args)
        answer(session, [*messages, {"role": "user", "content": args.prompt}], args)
        return 0
    m, inf, loras = open_inference(args)
    tokenizer = lugh.Tokenizer(m)
    prompt = tokenizer.encode(args.prompt, add_bos=True)
    sys.stdout.write(args.prompt)
    tokens = inf.generate_iter(
        prompt,
        max_tokens=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        lora=loras or None,
        seed=args.seed,
    )
    stream_text(tokenizer, prompt, tokens)
    return 0


# --- finetune -------------------------------------------------------------------------------


def read_texts(path: Path) -> list:
    """JSONL: a "text" field per line (or "prompt" + "completion"), or chat records
    ({"messages": [...]}, kept whole); other files: paragraphs."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            if isinstance(record, str):
                texts.append(record)
            elif "messages" in record:
                texts.append(record)
            elif "text" in record:
                texts.append(record["text"])
            elif "prompt" in record and "completion" in record:
                texts.append(record["prompt"] + record["completion"])
            else:
                raise ValueError(
                    f"{path}:{number}: expected a 'text' field, 'prompt' and 'completion', "
                    "or 'messages'"
                )
        if len({isinstance(t, str) for t in texts}) > 1:
            raise ValueError(f"{path}: mixes chat records ('messages') with texts")
        return texts
    return [p.strip() for p in raw.split("\n\n") if p.strip()]


def parse_targets(value: str) -> tuple:
    targets = tuple(t.strip() for t in value.split(",") if t.strip())
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise argparse.ArgumentTypeError(f"targets must be among {', '.join(TARGETS)}")
    return targets


def progress_callback(total_steps: int, label: str = "training"):
    """A tqdm progress bar (loss, tokens/s, ETA) fed by Trainer reports."""
    from tqdm import tqdm

    bar = tqdm(
        total=total_steps,
        desc=label,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
        file=sys.stderr,
    )

    def callback(report) -> bool:
        postfix = {"loss": f"{report.loss:.3f}", "tok/s": f"{report.tokens_per_s:.0f}"}
        if report.eval_loss is not None:
            postfix["eval"] = f"{report.eval_loss:.3f}"
            bar.write(f"step {report.step}: eval loss {report.eval_loss:.4f}", file=sys.stderr)
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        return False

    callback.bar = bar  # type: ignore[attr-defined]
    return callback


def cmd_finetune(args) -> int:
    m = lugh.Model(args.model)
    inf = lugh.Inference(m, n_threads=args.threads, device=args.device)
    if args.lora:
        lora = lugh.LoRA(args.lora, m).trainable_copy()
    else:
        lora = lugh.LoRA.create(
            m, rank=args.rank, alpha=args.alpha, targets=args.targets, seed=args.seed
        )
    texts = read_texts(Path(args.data))
    eval_texts = None
    if args.eval_every and len(texts) >= 10:
        n_eval = max(1, len(texts) // 10)
        texts, eval_texts = texts[:-n_eval], texts[-n_eval:]
    trainer = lugh.train.Trainer(
        inf,
        lora,
        lr=args.lr,
        batch_size=args.batch,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        schedule=args.schedule,
        warmup_steps=args.warmup,
        checkpoint=args.checkpoint,
        precision=args.precision,
        seed=args.seed or 0,
        chat_template=Path(args.chat_template).read_text() if args.chat_template else None,
        assistant_only_loss=not args.all_tokens,
    )
    windows = trainer.windows(texts)
    per_step = args.batch * args.grad_accum
    steps = args.steps or max(1, len(windows) // per_step) * (args.epochs or 1)
    print(
        f"fine-tuning {lora.n_weights} adapter pairs (rank {lora.rank()}) on {len(windows)} "
        f"windows of up to {args.seq_len} tokens: {steps} steps",
        file=sys.stderr,
    )
    callback = progress_callback(steps)
    reports = trainer.fit(
        windows, steps=steps, eval_data=eval_texts, eval_every=args.eval_every, callback=callback
    )
    callback.bar.close()
    last = reports[-1]
    print(
        f"final loss {last.loss:.4f} after {last.step} steps ({last.elapsed_s:.1f} s)",
        file=sys.stderr,
    )
    lora.save(args.out, out_type=args.out_type)
    print(f"saved {args.out}", file=sys.stderr)
    if args.peft_out:
        lora.save_peft(args.peft_out)
        print(f"saved {args.peft_out}/", file=sys.stderr)
    return 0


def add_lora_dtype(p: argparse.ArgumentParser) -> None:
    """The `--lora-dtype` of a command that runs adapters (vLLM's flag)."""
    p.add_argument(
        "--lora-dtype",
        choices=("auto", "f32", "f16", "bf16", "float32", "float16", "bfloat16"),
        help="round the adapters' factors to f16/bf16 (inexact; a decoded token reads half"
        " the bytes); default auto: as the files store them",
    )


def add_out_type(p: argparse.ArgumentParser) -> None:
    """The `--out-type` of a command that writes a GGUF adapter."""
    p.add_argument(
        "--out-type",
        default="f32",
        choices=("f32", "f16", "bf16"),
        help="the GGUF adapter's factors (f16/bf16: rounded, half the bytes)",
    )


# --- convert and merge ----------------------------------------------------------------------


def cmd_convert(args) -> int:
    if bool(args.out) == bool(args.peft_out):
        raise ValueError("give one of --out X.gguf (PEFT -> GGUF) or --peft-out DIR (GGUF -> PEFT)")
    m = lugh.Model(args.model)
    lora = lugh.LoRA(args.adapter, m)
    if args.out:
        lora.save(args.out, out_type=args.out_type)
        print(f"wrote {args.out} ({lora.n_weights} pairs, alpha {lora.alpha:g})", file=sys.stderr)
    else:
        lora.save_peft(args.peft_out)
        print(
            f"wrote {args.peft_out}/ ({lora.n_weights} pairs, alpha {lora.alpha:g})",
            file=sys.stderr,
        )
    return 0


def cmd_merge(args) -> int:
    m = lugh.Model(args.model)
    loras = load_loras(m, args.lora, args.lora_scale or [])
    lugh.merge(m, loras, args.out, out_type=args.out_type)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


# --- serve ----------------------------------------------------------------------------------


def parse_named_adapter(value: str) -> tuple:
    """`name=path` for `serve --lora`."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (`docker stop`, systemd) stops the server as Ctrl-C does, then exits 143."""
    raise SystemExit(128 + signum)


def cmd_serve(args) -> int:
    m = lugh.Model(args.model)
    inf = lugh.Inference(m, n_ctx=args.ctx, n_threads=args.threads, device=args.device)
    names = [name for name, _ in args.lora]
    if len(set(names)) != len(names):
        raise ValueError(f"--lora names must differ: {names}")
    server = lugh.Server(
        inf,
        {name: lugh.LoRA(path, m, dtype=args.lora_dtype) for name, path in args.lora},
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        api_key=args.api_key or os.environ.get("LUGH_API_KEY"),
        max_tokens=args.max_tokens,
        chat_template=Path(args.chat_template).read_text() if args.chat_template else None,
        model_name=args.served_model_name,
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    adapters = ", ".join(names) or "none"
    print(
        f"lugh serve: {server.url} (model {args.model}, adapters: {adapters},"
        f" device {inf.device}); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    server.wait()
    return 0


# --- demo -----------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    return demo.run(
        steps=args.steps,
        seconds=args.seconds,
        out=args.out,
        threads=args.threads,
        device=args.device,
    )


# --- parser ---------------------------------------------------------------------------------


def model_arguments(p: argparse.ArgumentParser) -> None:
    """What `generate` and `chat` share: the model, adapters, sampling and chat options."""
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--lora", action="append", help="adapter (.gguf, PEFT dir); repeatable")
    p.add_argument(
        "--lora-scale", action="append", type=float, help="scale of each --lora, in order"
    )
    add_lora_dtype(p)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int)
    p.add_argument("--ctx", type=int, help="context size (default: the model's)")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--chat-template", help="Jinja file (default: the model's own template)")
    p.add_argument("--system", help="a system message opening the conversation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lugh", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lugh {lugh.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture, hyper-parameters and tensor table of a GGUF")
    p.add_argument("model")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("generate", help="generate text, streamed")
    model_arguments(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("-n", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument(
        "--chat", action="store_true", help="the prompt is a user message: answer it as a chat"
    )
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", help="an interactive chat, streamed, in the model's chat template")
    model_arguments(p)
    p.add_argument("-n", type=int, default=512, help="tokens per answer at most (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("finetune", help="train a LoRA adapter on text or JSONL")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--data", required=True, help="text file (paragraphs) or JSONL with 'text'")
    p.add_argument("--out", required=True, help="adapter to write (.gguf)")
    add_out_type(p)
    p.add_argument("--peft-out", help="also write a PEFT directory")
    p.add_argument("--lora", help="continue training this adapter instead of creating one")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument(
        "--targets", type=parse_targets, default=("attn_q", "attn_v"), help="comma-separated"
    )
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int)
    steps.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", default="cosine", choices=lugh.optim.SCHEDULES)
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument(
        "--eval-every", type=int, default=0, help="eval loss every N steps on 10%% held out"
    )
    p.add_argument("--checkpoint", action="store_true", help="recompute activations to save memory")
    p.add_argument(
        "--precision",
        default="f32",
        choices=("f32", "bf16"),
        help="f32: exact (default); bf16: the base's products in bf16, faster",
    )
    p.add_argument(
        "--chat-template", help="Jinja file for chat records (default: the model's own template)"
    )
    p.add_argument(
        "--all-tokens",
        action="store_true",
        help="chat records: score every token, not only the assistant's",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("convert", help="PEFT -> GGUF adapter, or GGUF -> PEFT")
    p.add_argument("adapter", help="PEFT directory or .gguf adapter")
    p.add_argument(
        "--model", "-m", required=True, help="the base model (for shapes and q/k layout)"
    )
    p.add_argument("--out", help="GGUF adapter to write")
    add_out_type(p)
    p.add_argument("--peft-out", help="PEFT directory to write")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("merge", help="write a model with adapters merged into its weights")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--lora", action="append", required=True)
    p.add_argument("--lora-scale", action="append", type=float)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--out-type", help="weight type of the output (f32, f16, q8_0, ...); default: the base's"
    )
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("serve", help="an OpenAI-compatible server; adapters chosen per request")
    p.add_argument("--model", "-m", required=True)
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        type=parse_named_adapter,
        metavar="NAME=PATH",
        help="an adapter (.gguf or PEFT dir) requests choose by NAME; repeatable",
    )
    add_lora_dtype(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (default 8080)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--ctx", "--n-ctx", type=int, help="context size (default: the model's)")
    p.add_argument("--max-tokens", type=int, help="most tokens per request (default: context)")
    p.add_argument("--api-key", help="required as 'Authorization: Bearer KEY' (or LUGH_API_KEY)")
    p.add_argument("--chat-template", help="Jinja file (default: the model's own template)")
    p.add_argument("--served-model-name", help="the base model's name (default: file stem)")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("demo", help="generate, fine-tune for about a minute, generate again")
    p.add_argument(
        "--steps", type=int, help="training steps (default: as many as fit in --seconds)"
    )
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--out", help="where to save the adapter (default: a temporary folder)")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("lugh: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, IndexError, KeyError, TypeError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lugh: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
