"""Clear errors for bad input: unsupported task, too-long prompt, missing model, bad prompt types."""

import pytest

from tokenpool import LLM, EngineArgs, PoolingParams, TokensPrompt
from tokenpool.loader.model_files import ModelNotFoundError


@pytest.fixture(scope="module")
def llm(minilm_path):
    return LLM(str(minilm_path), dtype="float32")


def test_unsupported_task_names_supported_ones(llm):
    with pytest.raises(ValueError, match=r"Supported tasks: embed, token_embed"):
        llm.encode(["hi"], pooling_task="token_classify", use_tqdm=False)
    with pytest.raises(ValueError, match="classify"):
        llm.classify(["hi"])


def test_too_long_prompt(llm):
    long = "word " * 400  # > 256 tokens (MiniLM's max_seq_length)
    with pytest.raises(ValueError, match=r"maximum context length is 256 tokens\. However, your request has \d+ input tokens"):
        llm.embed([long], use_tqdm=False)


def test_truncation_keeps_last_tokens(llm):
    long = " ".join(f"w{i}" for i in range(400))
    out = llm.encode([long], pooling_task="token_embed", tokenization_kwargs={"truncate_prompt_tokens": 20}, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == 20
    assert out.outputs.data.shape == (20, 384)
    assert out.prompt_token_ids[0] == 101 and out.prompt_token_ids[-1] == 102  # [CLS] ... [SEP] kept
    full = llm.encode([long], pooling_task="token_embed", tokenization_kwargs={"truncate_prompt_tokens": -1}, use_tqdm=False)[0]
    assert len(full.prompt_token_ids) == 256
    toks = llm.encode([TokensPrompt(prompt_token_ids=list(range(1000, 1300)))], pooling_task="token_embed",
                      truncate_prompt_tokens=10, use_tqdm=False)[0]
    assert toks.prompt_token_ids == list(range(1290, 1300))
    with pytest.raises(ValueError, match="greater than max_model_len"):
        llm.embed([long], tokenization_kwargs={"truncate_prompt_tokens": 1000}, use_tqdm=False)


@pytest.mark.parametrize(
    "prompt, exc, match",
    [
        (123, TypeError, "prompts must be a str, a prompt dict or a list"),
        ([None], TypeError, "Prompt 0 has type NoneType"),
        ([{"text": "hi"}], ValueError, "without 'prompt'"),
        ([{"prompt_token_ids": ["a"]}], TypeError, "list of ints"),
        ([{"prompt_token_ids": [10**9]}], ValueError, "out of the vocabulary"),
        ([{"prompt_token_ids": []}], ValueError, "empty"),
        ([""], None, None),
        ([{"prompt": "hi", "multi_modal_data": {"image": object()}}], ValueError, "multimodal"),
    ],
)
def test_bad_prompts(llm, prompt, exc, match):
    if exc is None:  # an empty string still has [CLS] [SEP]
        assert llm.embed(prompt, use_tqdm=False)[0].outputs.hidden_size == 384
        return
    with pytest.raises(exc, match=match):
        llm.embed(prompt, use_tqdm=False)


def test_bad_params_and_args(llm, minilm_path):
    with pytest.raises(ValueError, match="alias"):
        PoolingParams(use_activation=True, normalize=False)
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=0)
    with pytest.raises(ValueError, match=r"outside 1\.\.384, the embedding size"):
        llm.embed(["hi"], PoolingParams(dimensions=1000), use_tqdm=False)
    with pytest.raises(ValueError, match="'embed' task only"):
        llm.encode(["hi"], PoolingParams(dimensions=8), pooling_task="token_embed", use_tqdm=False)
    with pytest.raises(ValueError, match="Unsupported tokenization_kwargs"):
        llm.embed(["hi"], tokenization_kwargs={"padding": True}, use_tqdm=False)
    with pytest.raises(TypeError, match="Unknown engine argument"):
        LLM(str(minilm_path), not_an_option=1)
    with pytest.raises(ValueError, match="runner='generate'"):
        EngineArgs(model="x", runner="generate")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineArgs(model="x", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="greater than the model's context length"):
        LLM(str(minilm_path), max_model_len=100000)
    with pytest.raises(ValueError, match="Unknown dtype"):
        LLM(str(minilm_path), dtype="float8")


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match=r"'someone/no-such-model' was not found.*HF_HUB_OFFLINE"):
        LLM("someone/no-such-model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        LLM(str(tmp_path / "empty"))


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"architecture .* is not supported\. Supported: BertForMaskedLM"):
        LLM(str(tmp_path))
