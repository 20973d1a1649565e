"""The built-in demo: a small Llama and three LoRA adapters, trained once and shipped in the package.

Boundary: `demo_paths()` names the shipped files (loramux/demo_weights/: an HF model directory with
its tokenizer and three PEFT adapter directories); `loramux serve` with no model serves them as they
are, with no training and no download. `python -m loramux.demo build --out DIR` retrains them from
fixed seeds (about an hour on 2 CPU cores; only to change the demo, then copy DIR over
loramux/demo_weights/), and `python -m loramux.demo check DIR` scores a build on held-out phrases.

The tasks are tiny text transforms, so different adapters answer the same prompt visibly
differently. The trained prompt is "say: <text>\\n"; a plain prompt is taken as the text itself:

    base "demo"  echo       say: hello world -> hello world
    upper        upper case                  -> HELLO WORLD
    reverse      reversed                    -> dlrow olleh
    novowels     vowels dropped              -> hll wrld

Chat works too: the chat template turns the user's message into that prompt.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import string
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BASE_NAME = "demo"
WEIGHTS = Path(__file__).parent / "demo_weights"
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
_CORE_WORDS = (  # the first demo's words (some, like "lora", are not everyday English)
    "hello world lora adapter model serve batch token cache fast fair quick brown fox jumps over "
    "lazy dog cat sun moon star tree river blue green red apple music data code test open light "
    "dark night day good time year people way thing man woman child life hand part place case week "
    "work point home water room mother area money story fact month book eye job word side kind head "
    "house friend power game line end city name team idea face art war peace love food rain snow "
    "wind fire stone sea the a is of to and in it you my we they this that "
).split()
NUM_EVERYDAY = 3000  # the most frequent English words (wordfreq), letters only
MAX_WORDS = 4
BATCH = 48
BASE_STEPS = 3600
ADAPTER_STEPS = {"upper": 1400, "reverse": 3600, "novowels": 1800}  # reversing takes longest to learn
SAY_SHARE = 0.6  # the rest of the training prompts are the plain text, so plain prompts answer too
NEWLINE_SHARE = 0.3  # of the plain prompts, those that end in a newline (as "say: ...\n" does)
WILD_SHARE = 0.25  # text beyond the vocabulary (any case, other words, digits, punctuation)
_WILD_CHARS = string.ascii_letters + string.digits + ".,?!'-:{}[]\"_"
JSON_SHARE = 0.3  # of the wild texts, small JSON objects: the base echoes JSON (structured output)
HELD_OUT_SEED, HELD_OUT_N = 12345, 200


def say(text: str) -> str:
    """The demo's prompt format for `text`."""
    return f"say: {text}\n"


def demo_paths(root: Path | None = None) -> tuple[Path, dict[str, Path]]:
    """(model directory, {adapter name: directory}) of the shipped demo, or of a build in `root`."""
    base = root or WEIGHTS
    return base / "model", {name: base / "adapters" / name for name in ADAPTERS}


@functools.cache
def words() -> tuple[str, ...]:
    """The demo's vocabulary: the NUM_EVERYDAY most frequent English words made of letters a-z, by
    the word-frequency package wordfreq (a build and test dependency, not a serving one), and the
    first demo's words."""
    from wordfreq import top_n_list

    common = [w for w in top_n_list("en", 2 * NUM_EVERYDAY) if w.isascii() and w.isalpha()]
    return tuple(dict.fromkeys([*common[:NUM_EVERYDAY], *_CORE_WORDS]))


def phrase(rng: random.Random) -> str:
    """One to four words from the demo's vocabulary."""
    vocab = words()
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, MAX_WORDS)))


def wild_text(rng: random.Random) -> str:
    """Text beyond the demo's vocabulary, so that any prompt gets a transformed answer: one to five
    parts, each a vocabulary word in any case or a random run of letters, digits and punctuation."""
    if rng.random() < JSON_SHARE:
        vocab = words()
        obj = {
            rng.choice(vocab): rng.choice((rng.choice(vocab), rng.randint(0, 999), rng.random() < 0.5))
            for _ in range(rng.randint(1, 3))
        }
        return json.dumps(obj, separators=(",", ":") if rng.random() < 0.5 else None)
    parts = []
    for _ in range(rng.randint(1, 5)):
        if rng.random() < 0.5:
            word = rng.choice(words())
            parts.append(rng.choice((word, word.title(), word.upper())))
        else:
            parts.append("".join(rng.choice(_WILD_CHARS) for _ in range(rng.randint(1, 8))))
    return " ".join(parts)


def held_out_phrases(n: int = HELD_OUT_N, seed: int = HELD_OUT_SEED) -> list[str]:
    """Phrases training never shows (the build skips them): the demo is scored on these."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        p = phrase(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


class _Data:
    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.tok, self.rng = tokenizer, random.Random(seed)
        self.held_out = {p.lower() for p in held_out_phrases()}

    def _text(self) -> str:
        while True:
            text = wild_text(self.rng) if self.rng.random() < WILD_SHARE else phrase(self.rng)
            if text not in self.held_out:
                return text

    def batch(self, task: str, n: int = BATCH) -> tuple[Any, Any]:
        import torch

        rows = []
        for _ in range(n):
            text = self._text()
            if task == "echo" and text.islower() and self.rng.random() < 0.4:
                text = text.upper()  # the base sees upper case too, so those tokens are trained
            if self.rng.random() < SAY_SHARE:
                prompt = self.tok.encode(say(text))
            else:
                prompt = self.tok.encode(text + "\n" if self.rng.random() < NEWLINE_SHARE else text)
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


def build_demo(out: Path, progress: bool = True, steps_scale: float = 1.0) -> dict[str, Any]:
    """Train the demo base model and adapters into `out` from fixed seeds; returns the losses.
    `steps_scale` < 1 trains that fraction of the steps (a quick check that the recipe runs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramux.bench.artifacts import train_bpe_tokenizer

    torch.manual_seed(0)
    corpus = [say(phrase(random.Random(i))) for i in range(500)]
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
    steps = {"echo": BASE_STEPS, **ADAPTER_STEPS}
    steps = {task: max(1, round(n * steps_scale)) for task, n in steps.items()}
    losses: dict[str, float] = {}
    start = time.monotonic()
    with tqdm(total=sum(steps.values()), desc="training the demo model", disable=not progress) as bar:
        losses["echo"] = _train(model, data, "echo", steps["echo"], 4e-3, 50, bar)
        model.save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for name in ADAPTERS:
            torch.manual_seed(len(losses))
            base = LlamaForCausalLM.from_pretrained(out / "model")
            pm = get_peft_model(
                base, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0)
            )
            losses[name] = _train(pm, data, name, steps[name], 5e-3, 30, bar)
            folder = out / "adapters" / name
            pm.save_pretrained(folder)
            _clean_adapter(folder)
    return {"steps": steps, "final_loss": losses, "train_s": round(time.monotonic() - start)}


def _clean_adapter(folder: Path) -> None:
    """No build machine's path in the shipped config, and no generated model card."""
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)


def score(root: Path | None = None, phrases: Iterable[str] | None = None) -> dict[str, float]:
    """Greedy exact-match rate per task and prompt format ("echo/say", "upper/plain",
    "upper/plain_newline", ...) on
    `phrases` (default: the held-out ones), served by loramux's own engine."""
    from loramux import LLM, LoRARequest, SamplingParams

    texts = list(phrases or held_out_phrases())
    model_dir, adapters = demo_paths(root)
    llm = LLM(str(model_dir), max_loras=len(ADAPTERS))
    params = SamplingParams(max_tokens=2 * max(len(t) for t in texts) + 8, temperature=0.0)
    result = {}
    for i, task in enumerate(("echo", *ADAPTERS)):
        lora = None if task == "echo" else LoRARequest(task, i, str(adapters[task]))
        for fmt, prompt in (("say", say), ("plain", lambda t: t), ("plain_newline", lambda t: t + "\n")):
            outs = llm.generate([prompt(t) for t in texts], params, lora, use_tqdm=False)
            right = sum(o.outputs[0].text == TASKS[task](t) for o, t in zip(outs, texts, strict=True))
            result[f"{task}/{fmt}"] = right / len(texts)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loramux.demo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="train the demo into --out (then score it)")
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--steps-scale", type=float, default=1.0, help="train this fraction of the steps")
    build.add_argument(
        "--score", action=argparse.BooleanOptionalAction, default=True, help="score it on held-out phrases"
    )
    check = sub.add_parser("check", help="score a demo build (default: the shipped one)")
    check.add_argument("dir", type=Path, nargs="?", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        tmp = args.out.with_name(args.out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        info = build_demo(tmp, steps_scale=args.steps_scale)
        if args.score:
            info["held_out_exact"] = score(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(args.out, ignore_errors=True)
        tmp.rename(args.out)
        print(json.dumps(info, indent=2))
    else:
        print(json.dumps(score(args.dir), indent=2))


if __name__ == "__main__":
    main()
