"""Fidelity of converted GGUFs with llama.cpp itself: its tokenizer against the `tokenizers`
library, its logits against an independent numpy Qwen2 (tests/qwen2_reference.py), and the
converter's memory use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwq_local.backend import binding as backend
from qwq_local.convert.checkpoint import open_checkpoint
from qwq_local.convert.pipeline import convert
from qwq_local.synthetic.factory import load_tiny_weights, make_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).parents[1]))
from qwen2_reference import forward, load_config  # noqa: E402


def _tensor_names(path: Path) -> set[str]:
    import gguf

    return {t.name for t in gguf.GGUFReader(path).tensors}


# --- fidelity with llama.cpp -----------------------------------------------------------------

CORPUS = [
    "Hello world! How are you today?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # slow\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "我想在apple工作1314151天～ 你好，世界！",
    "日本語のテキストと한국어 텍스트",
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ 🦙🦙",
    "   leading spaces, \t\ttabs,\n\n\nnewlines \r\n and trailing   ",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "3 33 333 3333 33333 333333 3.3 3..3 3...3",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call><tool_response>ok</tool_response></think>",
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!??????",
    "Ça va? Naïve café, résumé — “quotes” ‘single’ …",
]


def test_tokenization_matches_tokenizers_library(tiny_gguf, tiny_checkpoint):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    model = backend.Model.load(tiny_gguf, vocab_only=True, extra_bufts=False)
    try:
        for text in CORPUS:
            want = hf.encode(text, add_special_tokens=False).ids
            assert model.tokenize(text, add_special=True, parse_special=True) == want, text
        assert model.n_vocab == open_checkpoint(tiny_checkpoint).config.vocab_size
    finally:
        model.close()


def _llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    model = backend.Model.load(path, extra_bufts=False)
    try:
        with backend.Context(model, n_ctx=256, logits_all=True) as ctx:
            ctx.decode(tokens, logits="all")
            return np.stack([ctx.logits(i).astype(np.float64) for i in range(len(tokens))])
    finally:
        model.close()


def _prompt(ckpt: Path) -> list[int]:
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return hf.encode("<|im_start|>user\nHow many r's are in strawberry? Think it through.<|im_end|>\n"
                     "<|im_start|>assistant\n<think>\n", add_special_tokens=False).ids


def _rel_rmse(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


def _assert_logits_match(ckpt: Path, gguf_path: Path, *, max_rel_rmse: float) -> float:
    tokens = _prompt(ckpt)
    ref = forward(load_tiny_weights(ckpt), load_config(ckpt), tokens)
    err = _rel_rmse(_llama_logits(gguf_path, tokens), ref)
    assert err < max_rel_rmse, f"relative RMSE {err:.4%} vs the numpy reference"
    return err


@pytest.mark.parametrize("which", ["f32", "bf16"])
def test_logits_match_numpy_reference(which, tiny_checkpoint, tiny_gguf, tiny_gguf_f32):
    path = tiny_gguf_f32 if which == "f32" else tiny_gguf
    _assert_logits_match(tiny_checkpoint, path, max_rel_rmse=0.01)


def test_reference_comparison_can_fail(tiny_checkpoint, tiny_gguf_f32):
    """The 1% bar is meaningful: a reference with the wrong RoPE base misses it by far."""
    tokens = _prompt(tiny_checkpoint)
    cfg = {**load_config(tiny_checkpoint), "rope_theta": 10_000.0}
    wrong = forward(load_tiny_weights(tiny_checkpoint), cfg, tokens)
    assert _rel_rmse(_llama_logits(tiny_gguf_f32, tokens), wrong) > 0.05


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    out = convert(ckpt, tmp_path / "tied.gguf", outtype="f32")
    names = _tensor_names(out)
    assert "output.weight" not in names and "token_embd.weight" in names
    # llama.cpp then uses token_embd as the output head: logits still match the reference
    _assert_logits_match(ckpt, out, max_rel_rmse=0.01)



# --- memory ----------------------------------------------------------------------------------

def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    """Converting a ~100 MB checkpoint to f32 (~200 MB out) raises peak RSS by far less than the
    model: data is streamed in chunks, never held."""
    ckpt = make_tiny_checkpoint(tmp_path / "big", hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
                                intermediate_size=4096, num_hidden_layers=3, pad_vocab_to=2048)
    model_bytes = open_checkpoint(ckpt).tensor_bytes
    # VmHWM (this process's own peak RSS): ru_maxrss would include the parent's peak, inherited
    # across exec
    code = (
        "import sys, re\n"
        "import numpy, gguf\n"
        "from qwq_local.gguf import check as gguf_check\n"
        "from qwq_local.convert import convert\n"
        "def hwm():\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
        "base = hwm()\n"
        "convert(sys.argv[1], sys.argv[2], outtype='f32')\n"
        "print(base, hwm())\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(ckpt), str(tmp_path / "big.gguf")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    base, peak = map(int, res.stdout.split())
    assert model_bytes > 90 * 2**20
    assert peak - base < 80 * 2**20, (base, peak, model_bytes)
    assert peak < 200 * 2**20
