"""A patched transformers model in use: training from the same init, Trainer, pipelines, and the
converter's transformers keyword names. Everything is built from configs, weights and a vocabulary the
tests create; nothing is downloaded. Dropout 0, fp32, CPU path.
"""

import copy
import os

import pytest
import torch
import transformers

import fastbert
from fastbert.hf import patch_hf

WORDS = ("the a of to and in is it that was for on are with as his they be at one have this from or had "
         "by word but what some we can out other were all there when up use your how said an each she "
         "which do their time if will way about many then them write would like so these her long make "
         "thing see him two has look more day could go come did number sound no most people my over").split()


def config(**kw):
    args = dict(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=0)
    args.update(kw)
    return transformers.BertConfig(**args)


def mlm_batch(vocab, batch=8, seq=16, mask_id=4):
    lengths = torch.randint(4, seq + 1, (batch,))
    lengths[0] = seq
    keep = torch.arange(seq)[None] < lengths[:, None]
    ids = torch.randint(5, vocab, (batch, seq)).masked_fill(~keep, 0)
    chosen = (torch.rand(batch, seq) < 0.3) & keep
    labels = ids.masked_fill(~chosen, -100)
    return {"input_ids": ids.masked_fill(chosen, mask_id), "attention_mask": keep.long(), "labels": labels}


@pytest.mark.parametrize("fused,steps", [(False, 30), (True, 6)])
def test_convergence_same_as_stock(fused, steps, monkeypatch):
    """A small BERT trained 30 AdamW steps with and without the patch from the same init: the loss
    agrees at every step (errors grow through the optimizer, so 1e-4 relative) and falls. On the fused
    path (Triton interpreter, slow) 6 steps on smaller batches."""
    device = "cpu"
    if fused:
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            pytest.skip("the fused path needs CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("FASTBERT_BACKEND", "triton")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = config()
    torch.manual_seed(0)
    stock = transformers.BertForMaskedLM(cfg).to(device).train()
    patched = patch_hf(copy.deepcopy(stock)).train()
    torch.manual_seed(1)
    batch, seq = (4, 12) if fused else (8, 16)
    batches = ([mlm_batch(cfg.vocab_size, batch, seq) for _ in range(3)] * 10)[:steps]  # three, repeated
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    losses = {}
    for name, model in (("stock", stock), ("patched", patched)):
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        losses[name] = []
        for batch in batches:
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    for step, (a, b) in enumerate(zip(losses["stock"], losses["patched"], strict=True)):
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)
    assert losses["patched"][-1] < losses["patched"][0] - (0.2 if steps >= 30 else 0.0), losses["patched"]


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_trainer_steps_match_stock(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (requirements-dev.txt)")
    cfg = config(num_labels=3)
    torch.manual_seed(0)
    stock = transformers.BertForSequenceClassification(cfg)
    patched = patch_hf(copy.deepcopy(stock))
    torch.manual_seed(2)
    batch = mlm_batch(cfg.vocab_size, batch=16)
    rows = [{"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i],
             "labels": torch.tensor(i % 3)} for i in range(16)]
    history = {}
    for name, model in (("stock", stock), ("patched", patched)):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
            logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_ListDataset(rows))
        trainer.train()
        history[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(history["patched"]) == 4
    for a, b in zip(history["stock"], history["patched"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), history
    assert fastbert.hf.is_patched(patched)


@pytest.fixture
def tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    cls = getattr(transformers, "BertTokenizerFast", transformers.BertTokenizer)
    return cls(vocab_file=str(vocab))


TEXTS = ["the word was long", "they said it would come out of the way for many people",
         "a day", "what is the number of this sound"]


def test_pipeline_fill_mask(tokenizer):
    cfg = config(vocab_size=len(tokenizer))
    torch.manual_seed(3)
    stock = transformers.BertForMaskedLM(cfg).eval()
    patched = patch_hf(copy.deepcopy(stock))
    texts = ["the [MASK] was long", "they said it would [MASK] out of the way for many people"]
    results = [transformers.pipeline("fill-mask", model=m, tokenizer=tokenizer, top_k=5, device="cpu")(
        texts, batch_size=2) for m in (stock, patched)]
    for ref_row, row in zip(*results, strict=True):
        assert [r["token"] for r in row] == [r["token"] for r in ref_row]
        for r, q in zip(row, ref_row, strict=True):
            assert abs(r["score"] - q["score"]) <= 1e-5 * q["score"] + 1e-7


def test_pipeline_text_classification(tokenizer):
    cfg = config(vocab_size=len(tokenizer), num_labels=3)
    torch.manual_seed(4)
    stock = transformers.BertForSequenceClassification(cfg).eval()
    patched = patch_hf(copy.deepcopy(stock))
    results = [transformers.pipeline("text-classification", model=m, tokenizer=tokenizer, top_k=None,
                                     device="cpu")(TEXTS, batch_size=4) for m in (stock, patched)]
    for ref_row, row in zip(*results, strict=True):
        ref_scores = {r["label"]: r["score"] for r in ref_row}
        assert {r["label"] for r in row} == set(ref_scores)
        for r in row:
            assert abs(r["score"] - ref_scores[r["label"]]) <= 1e-5


def test_from_hf_speaks_transformers_names():
    """fastbert.from_hf's encoder takes token_type_ids=, attention_mask=, position_ids= keywords and
    its documented positional order (input_ids, token_type_ids, attention_mask, position_ids)."""
    cfg = config()
    torch.manual_seed(5)
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    enc = fastbert.from_hf(hf).eval()
    batch = mlm_batch(cfg.vocab_size, batch=3, seq=12)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    types = torch.randint(0, 2, ids.shape) * mask
    positions = torch.randint(0, cfg.max_position_embeddings, ids.shape)
    keep = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, position_ids=positions)
        ref = ref.last_hidden_state
        by_name = enc(ids, token_type_ids=types, attention_mask=mask, position_ids=positions)
        by_position = enc(ids, types, mask, positions)
        default_positions = enc(input_ids=ids, token_type_ids=types, attention_mask=mask)
        ref_default = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    for out, want, what in ((by_name, ref, "keywords"), (by_position, ref, "positional"),
                            (default_positions, ref_default, "default positions")):
        err = (out[keep] - want[keep]).abs().max().item()
        assert err <= 1e-5, (what, err)
