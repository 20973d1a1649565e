"""The built-in demo: a small Llama and three LoRA adapters, trained offline on first use.

Boundary: builds files only (an HF model directory and PEFT adapter
directories) under the user cache folder; `loramux serve` with no model
serves them. Everything comes from fixed seeds; nothing is downloaded.

The tasks are tiny text transforms, so different adapters answer the same
prompt visibly differently. A prompt is "say: <text>\\n"; the answer follows:

    base "demo"  echo       say: hello world -> hello world
    upper        upper case                  -> HELLO WORLD
    reverse      reversed                    -> dlrow olleh
    novowels     vowels dropped              -> hll wrld

Chat works too: the chat template turns the user's message into that prompt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEMO_VERSION = "v1"
BASE_NAME = "demo"
TASKS: dict[str, Callable[[str], str]] = {
    "echo": lambda s: s,
    "upper": str.upper,
    "reverse": lambda s: s[::-1],
    "novowels": lambda s: "".join(c for c in s if c.lower() not in "aeiou"),
}
ADAPTERS = ("upper", "reverse", "novowels")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}say: {{ m['content'] }}\n{% endif %}{% endfor %}"
)
_WORDS = (  # one string, split: easier to read than a list of 100 literals
    "hello world lora adapter model serve batch token cache fast fair quick brown fox jumps over "
    "lazy dog cat sun moon star tree river blue green red apple music data code test open light "
    "dark night day good time year people way thing man woman child life hand part place case week "
    "work point home water room mother area money story fact month book eye job word side kind head "
    "house friend power game line end city name team idea face art war peace love food rain snow "
    "wind fire stone sea the a is of to and in it you my we they this that "
).split()
BASE_STEPS, BATCH = 450, 48
ADAPTER_STEPS = {"upper": 220, "reverse": 420, "novowels": 220}  # reversing takes the longest to learn


def cache_root() -> Path:
    """$LORAMUX_CACHE_DIR, else $XDG_CACHE_HOME/loramux, else ~/.cache/loramux."""
    env = os.environ.get("LORAMUX_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loramux"


def demo_paths(root: Path | None = None) -> tuple[Path, dict[str, Path]]:
    base = (root or cache_root()) / f"demo-{DEMO_VERSION}"
    return base / "model", {name: base / "adapters" / name for name in ADAPTERS}


def ensure_demo(root: Path | None = None, progress: bool = True) -> tuple[Path, dict[str, Path]]:
    """The demo's model and adapter directories, built first if they are not there yet."""
    root = root or cache_root()
    final = root / f"demo-{DEMO_VERSION}"
    if not (final / "READY").is_file():
        root.mkdir(parents=True, exist_ok=True)
        with _lock(root / f"demo-{DEMO_VERSION}.lock"):
            if not (final / "READY").is_file():  # another process may have built it meanwhile
                tmp = root / f"demo-{DEMO_VERSION}.tmp-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                build_demo(tmp, progress)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
    return demo_paths(root)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _phrase(rng: random.Random) -> str:
    """One to three words from the demo's vocabulary. (Random letter strings would teach a general
    copy, but on 2 cores that takes far longer than a demo build may: measured, loss 0.62 after 650
    steps with 10% random strings against 0.05 after 450 without.)"""
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3)))


class _Data:
    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.tok, self.rng = tokenizer, random.Random(seed)

    def batch(self, task: str, n: int = BATCH) -> tuple[Any, Any]:
        import torch

        rows = []
        for _ in range(n):
            text = _phrase(self.rng)
            if task == "echo" and self.rng.random() < 0.4:
                text = text.upper()  # the base sees upper case too, so those tokens are trained
            prompt = self.tok.encode(f"say: {text}\n")
            answer = self.tok.encode(TASKS[task](text)) + [self.tok.eos_token_id]
            rows.append((prompt, answer))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((n, width), self.tok.pad_token_id)
        labels = torch.full((n, width), -100)
        for i, (p, a) in enumerate(rows):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)  # learn the answer only
        return ids, labels


def _train(model: Any, data: _Data, task: str, steps: int, lr: float, warmup: int, bar: Any) -> float:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (1 - step / steps)
        ids, labels = data.batch(task)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        bar.update(1)
        bar.set_postfix(task=task, loss=f"{loss.item():.3f}")
    model.eval()
    return float(loss.item())


def build_demo(out: Path, progress: bool = True) -> None:
    """Train the demo base model and adapters into `out` (a few minutes on 2 CPU cores)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramux.bench.artifacts import train_bpe_tokenizer

    torch.manual_seed(0)
    corpus = [f"say: {_phrase(random.Random(i))}\n" for i in range(500)]
    tok = train_bpe_tokenizer(corpus, vocab_size=259)  # 256 bytes + 3 specials: one token per byte
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    data = _Data(tok, seed=0)
    total = BASE_STEPS + sum(ADAPTER_STEPS.values())
    losses: dict[str, float] = {}
    with tqdm(total=total, desc="building the demo model (first start only)", disable=not progress) as bar:
        losses["echo"] = _train(model, data, "echo", BASE_STEPS, 4e-3, 50, bar)
        model.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for name in ADAPTERS:
            torch.manual_seed(len(losses))
            base = LlamaForCausalLM.from_pretrained(out / "model")
            pm = get_peft_model(
                base, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0)
            )
            losses[name] = _train(pm, data, name, ADAPTER_STEPS[name], 5e-3, 30, bar)
            pm.save_pretrained(out / "adapters" / name)
    (out / "training.json").write_text(json.dumps({"final_loss": losses}, indent=2))
    (out / "READY").write_text(DEMO_VERSION)
