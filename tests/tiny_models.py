"""Tiny Hugging Face models built from configs (hidden 64, 2 layers; no weights are downloaded),
PEFT VeRA twins with random lambdas, and the comparisons the model tests share."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

transformers.utils.logging.set_verbosity_error()

VOCAB = 97


def tiny_llama():
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2():
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def tiny_roberta():
    cfg = transformers.RobertaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=80, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=1, num_labels=3,
    )
    return transformers.RobertaForSequenceClassification(cfg)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "roberta": tiny_roberta}


def base_model(kind, seed=0, dtype=torch.float32):
    """A fresh tiny model of ``kind``; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    return BUILDERS[kind]().to(dtype).eval()


def inputs(batch=2, seq=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)


def output(model, ids):
    out = model(input_ids=ids)
    return out.logits


def peft_twin(base, r=8, key=1234, save_projection=True, target_modules="all-linear", lambda_seed=5):
    """``get_peft_model`` on ``base`` with random (non-initial) lambdas so the adapter matters."""
    cfg = peft.VeraConfig(r=r, target_modules=target_modules, projection_prng_key=key,
                          save_projection=save_projection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(lambda_seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return pm.eval()


def peft_lambdas(pm):
    """``{module path: (lambda_d, lambda_b)}`` of a PEFT VeRA model (the base model's paths)."""
    out = {}
    for name, p in pm.named_parameters():
        if "vera_lambda" in name:
            path = name[len("base_model.model."):].rsplit(".vera_lambda_", 1)[0]
            out.setdefault(path, {})[name.rsplit(".", 2)[-2][-1]] = p
    return {k: (v["d"], v["b"]) for k, v in out.items()}


def vk_lambdas(model):
    import vera_kernels.models as vkm

    return {k: (m.lambda_d, m.lambda_b) for k, m in vkm.vera_layers(model).items()}


def snapshot(model):
    """Everything a failed load must leave alone: module types and every tensor of the state dict."""
    types = {n: type(m) for n, m in model.named_modules()}
    sd = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return types, sd, grads


def assert_unchanged(model, snap):
    types, sd, grads = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(now[k], v), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
