"""``structprune prune --task causal-lm`` and ``structprune eval --task causal-lm`` end to end on a tiny random Llama
with a tiny word-level tokenizer built offline; perplexity over the real tokens only; text chunked into blocks."""
import json
import math

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import structprune as sp
from helpers import models as _models
from structprune.cli import main
from structprune.lm.data import batches, tokenize_blocks
from structprune.lm.perplexity import perplexity

one_thread_reference_backend = _models.one_thread_reference_backend  # the autouse fixture: reference ops, one thread

LINES = ["the cat sat on the mat", "a dog ran in the park", "the bird sang on a tree", "my cat and the dog play",
         "a tree in the park", "the mat is red and the tree is green"] * 4


def tiny_tokenizer():
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(LINES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="[EOS]")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "train.txt").write_text("\n".join(LINES) + "\n\n")
    (root / "dev.txt").write_text("the dog sat on the red mat\nthe bird and my cat\n")
    return root


def test_blocks_and_padding():
    tokenizer = tiny_tokenizer()
    blocks = tokenize_blocks(tokenizer, ["the cat sat", "a dog"], 4)  # 3 + 1 + 2 + 1 tokens: 4 and 3 + padding
    assert blocks["input_ids"].shape == (2, 4) and blocks["attention_mask"].tolist() == [[1] * 4, [1, 1, 1, 0]]
    assert blocks["input_ids"][0, 3] == tokenizer.eos_token_id and blocks["labels"][1, 3] == -100
    with pytest.raises(ValueError, match="block_size"):
        tokenize_blocks(tokenizer, ["the cat"], 1)


def test_perplexity_leaves_padding_out(lm_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(lm_dir / "model").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        want = math.exp(float(model(input_ids=ids, labels=ids).loss))  # HF's mean next-token NLL
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
              "attention_mask": torch.tensor([[1] * 6 + [0] * 3])}
    padded["labels"] = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
    got = perplexity(model, [padded])
    assert got["tokens"] == 5 and got["perplexity"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("method", ["l0", "gain", "random"])
def test_prune_then_eval(lm_dir, tmp_path, method):
    out = tmp_path / "prune"
    argv = ["prune", "--task", "causal-lm", "--model", str(lm_dir / "model"), "--data", str(lm_dir / "train.txt"),
            "--dev", str(lm_dir / "dev.txt"), "--method", method, "--kv-heads", "0.5", "--ffn", "0.5",
            "--block-size", "16", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3", "--distill",
            "--l0-warmup-steps", "2", "--gate-lr", "0.1", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm" and sum(metrics["kv_heads_kept"]) == 2
    assert metrics["ffn_kept"] <= 24 and metrics["perplexity"] > 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all("kd_loss" in e and "task_loss" in e for e in log)
    model = sp.from_pretrained(out / "model")
    assert sum(layer.self_attn.num_kv_heads for layer in model.model.layers) == 2
    assert sum(layer.self_attn.k_proj.out_features for layer in model.model.layers) == 2 * 8
    evaluated = tmp_path / "eval"
    assert main(["eval", "--task", "causal-lm", "--model", str(out / "model"), "--data", str(lm_dir / "dev.txt"),
                 "--block-size", "16", "--out", str(evaluated)]) == 0
    again = json.loads((evaluated / "metrics.json").read_text())
    assert again["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5)
    assert again["perplexity"] == pytest.approx(math.exp(again["nll"]), rel=1e-9)


def test_prune_to_a_parameter_budget(lm_dir, tmp_path):
    """--max-params counts query heads, the KV heads they read and GLU units: the saved model holds at most it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(lm_dir / "model")
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def gated(m):
        return sum(p.numel() for n, p in m.named_parameters() if any(f".{k}." in n for k in names))

    argv = ["prune", "--task", "causal-lm", "--model", str(lm_dir / "model"), "--data", str(lm_dir / "train.txt"),
            "--method", "gain", "--max-params", "0.5", "--block-size", "16", "--batch-size", "4", "--max-steps", "1",
            "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    pruned = sp.from_pretrained(tmp_path / "model")
    assert 0.4 * gated(model) < gated(pruned) <= 0.5 * gated(model)


@pytest.fixture(scope="module")
def lm_table(lm_dir, tmp_path_factory):
    """A latency table of the tiny Llama measured by ``structprune latency-table`` (3 rounds, one thread)."""
    root = tmp_path_factory.mktemp("table")
    argv = ["latency-table", "--model", str(lm_dir / "model"), "--at", "1x16", "--backend", "torch", "--threads", "1",
            "--repeats", "3", "--ffn-points", "2", "--cache-dir", str(root / "cache"), "--out", str(root / "t.json")]
    assert main(argv) == 0
    return root / "t.json"


def test_latency_table_of_a_causal_lm(lm_table, lm_dir, capsys):
    from structprune.latency import LatencyTable

    table = LatencyTable.load(lm_table)
    assert table.key.model["architecture"] == "LlamaForCausalLM" and table.num_kv_heads == 2
    assert table.key.model["prefill"] == "use_cache, logits_to_keep=1" and table.hidden_grid == [32]
    assert len(table.attention_ms) == 5 and len(table.kv_attention_ms) == 2 and table.ffn_grid == [0, 12, 24]
    assert main(["latency-table", "--model", str(lm_dir / "model"), "--at", "1x16", "--hidden-grid", "0.5"]) == 2
    assert "drop hidden_grid" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["l0", "gain", "random"])
def test_prune_to_a_speedup(lm_dir, lm_table, tmp_path, method):
    """``--speedup`` on a measured decoder table: the saved model's query heads, KV heads and units meet it."""
    from structprune.latency import LatencyTable

    table = LatencyTable.load(lm_table)
    speedup = 1 + 0.5 * (table.max_speedup - 1)  # within reach whatever the timing noise gave
    argv = ["prune", "--task", "causal-lm", "--model", str(lm_dir / "model"), "--data", str(lm_dir / "train.txt"),
            "--method", method, "--speedup", f"{speedup:.6f}", "--latency-table", str(lm_table), "--block-size", "16",
            "--batch-size", "4", "--max-steps", "3", "--l0-warmup-steps", "2", "--gate-lr", "0.1", "--threads", "1",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    model = sp.from_pretrained(tmp_path / "model")
    layers = model.model.layers
    heads, kv = [a.self_attn.num_heads for a in layers], [a.self_attn.num_kv_heads for a in layers]
    units = [a.mlp.down_proj.in_features for a in layers]
    assert metrics["kv_heads_kept"] == [k if h else 0 for h, k in zip(heads, kv)] and metrics["latency_at"] == "B1xL16"
    assert metrics["predicted_speedup"] >= speedup * (1 - 1e-6)
    assert table.speedup(metrics["heads_per_layer"], metrics["ffn_per_layer"], kv_heads=metrics["kv_heads_kept"]) == \
        pytest.approx(metrics["predicted_speedup"])
    assert sum(metrics["heads_per_layer"]) <= sum(heads) and sum(metrics["ffn_per_layer"]) <= sum(units)


def test_eval_of_a_plain_hf_model_matches_the_perplexity_function(lm_dir, tmp_path):
    assert main(["eval", "--task", "causal-lm", "--model", str(lm_dir / "model"), "--data", str(lm_dir / "dev.txt"),
                 "--block-size", "4", "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "metrics.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(lm_dir / "model")
    blocks = tokenize_blocks(tokenizer, (lm_dir / "dev.txt").read_text().splitlines(), 4)
    model = transformers.AutoModelForCausalLM.from_pretrained(lm_dir / "model")
    assert got["perplexity"] == pytest.approx(perplexity(model, batches(blocks, 2))["perplexity"], rel=1e-6)
    assert got["tokens"] == sum(int(m[1:].sum()) for m in blocks["attention_mask"])


def test_bad_input_is_one_line(lm_dir, tmp_path, capsys):
    base = ["prune", "--task", "causal-lm", "--model", str(lm_dir / "model"), "--method", "l0", "--out",
            str(tmp_path)]
    assert main(base) == 2 and "needs --data" in capsys.readouterr().err
    assert main(base + ["--data", str(lm_dir / "train.txt"), "--speedup", "2"]) == 2
    assert "--speedup / --latency-ms need --at" in capsys.readouterr().err
    assert main(base + ["--data", str(lm_dir / "train.txt"), "--speedup", "2", "--kv-heads", "0.5"]) == 2
    assert "--kv-heads with --speedup / --latency-ms" in capsys.readouterr().err
    assert main(base + ["--data", str(lm_dir / "train.txt"), "--bf16", "--l0-steps", "3"]) == 2
    assert "--bf16, --l0-steps: not available" in capsys.readouterr().err
    assert main(["prune", "--method", "l0", "--kv-heads", "0.5", "--out", str(tmp_path)]) == 2
    assert "--kv-heads is for --task causal-lm" in capsys.readouterr().err
