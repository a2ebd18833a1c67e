"""The unsplit reference trainings: one LoRA step shared by centralised, a site alone and the
Flower clients of bench/quality.py."""

import torch

from fsl_edge.baselines import lora_model, train_lora, train_steps
from fsl_edge.config import LearningSettings, TrainSettings
from fsl_edge.data import BatchStream, Example
from fsl_edge.lora import adapter_state
from fsl_edge.tiny import tiny_model

EXAMPLES = [Example(list(range(1, 2 + i)), list(range(1, 2 + i))) for i in range(10)]
SETTINGS = LearningSettings(train=TrainSettings(lr=1e-2, batch_size=4, seed=3))


def test_train_steps_counts_what_it_trained_on():
    lm, optimizer = lora_model(tiny_model("llama"), SETTINGS)
    loss, tokens, samples = train_steps(lm, optimizer, BatchStream(EXAMPLES, 4, 0, 0), 3)
    expected = BatchStream(EXAMPLES, 4, 0, 0)
    batches = [next(expected) for _ in range(3)]
    assert samples == 4 + 4 + 2 and tokens == sum(b.tokens for b in batches)
    assert torch.isfinite(torch.tensor(loss))


def test_train_lora_is_lora_model_then_train_steps():
    model = tiny_model("llama")
    a = adapter_state(train_lora(model, EXAMPLES, SETTINGS, 3, pad_id=0))
    lm, optimizer = lora_model(model, SETTINGS)
    train_steps(lm, optimizer, BatchStream(EXAMPLES, 4, SETTINGS.train.seed, 0), 3)
    b = adapter_state(lm)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = tiny_model("llama").state_dict()  # the base model itself was never touched
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


def test_lora_model_wraps_the_model_itself_when_asked():
    model = tiny_model("llama")
    lm, _ = lora_model(model, SETTINGS, copy_model=False)
    assert lm.get_base_model() is model
