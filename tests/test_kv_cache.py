"""The KV cache is passed and read under the installed transformers' name for it, silently."""

import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from heretic_like.kv_cache import OLD, cache_kwarg, output_cache, with_cache
from heretic_like.model import peft_quietly


def test_a_cache_round_trips_through_a_real_model_without_deprecation_warnings(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        first = model(input_ids=ids[:, :3], use_cache=True)
        cache = output_cache(first)
        assert cache is not None and cache.get_seq_length() == 3
        step = model(**with_cache(model, {"input_ids": ids[:, 3:], "use_cache": True}, cache))
        whole = model(input_ids=ids)
    assert not [w for w in caught if issubclass(w.category, FutureWarning | DeprecationWarning)]
    # continuing from the cache is the same computation as the whole sequence at once
    torch.testing.assert_close(step.logits[:, -1], whole.logits[:, -1], rtol=1e-4, atol=1e-5)
    assert output_cache(step).get_seq_length() == 4


def test_a_peft_wrapper_takes_the_name_of_the_model_it_wraps(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with peft_quietly():  # peft asks transformers for a deprecated property, not our code
        wrapped = get_peft_model(model, LoraConfig(r=1, target_modules=["o_proj"]))
    assert cache_kwarg(wrapped) == cache_kwarg(model)


def test_a_model_that_only_knows_the_old_name_gets_the_old_name():
    class RemoteCodeModel(torch.nn.Module):  # the shape of a model not migrated to `cache`
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return input_ids

    assert cache_kwarg(RemoteCodeModel()) == OLD
    assert with_cache(RemoteCodeModel(), {}, "kv") == {OLD: "kv"}
