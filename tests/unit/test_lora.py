"""LoRA (lora.rank > 0): which layers get adapters, the merged and adapter-only views that leave a learner, and a
PolicyLearner that trains adapters only, serves its base model as the reference, checkpoints and exports."""

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

from actors.hf import write_adapter
from actors.learner import PolicyLearner
from actors.training.lora import adapter_config, adapter_weights, add_adapters, merged_weights, target_modules
from cluster.local import free_port
from pipeline.config import AlgoConfig, Config, LearnerConfig, LoraConfig
from pipeline.types import TrainBatch
from tests.unit.test_learner import make_batch, on_policy

LORA = LoraConfig(rank=4, alpha=8)


def tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()


def tiny_phi3() -> Phi3ForCausalLM:
    cfg = Phi3Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, pad_token_id=0
    )
    return Phi3ForCausalLM(cfg).eval()


def perturbed(model):
    """`model` with adapters whose B is not zero (a fresh adapter is the identity: B = 0)."""
    peft_model = add_adapters(model, LORA)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft_model


def test_adapters_go_on_the_attention_and_mlp_projections_of_each_architecture(task_dir):
    llama = AutoModelForCausalLM.from_pretrained(task_dir / "models/policy")
    assert target_modules(llama) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert target_modules(tiny_gpt2()) == ["c_attn", "c_fc", "c_proj"]
    assert target_modules(tiny_phi3()) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_only_adapters_train_and_a_reward_head_trains_whole(task_dir):
    from transformers import AutoModelForSequenceClassification

    policy = add_adapters(AutoModelForCausalLM.from_pretrained(task_dir / "models/policy"), LORA)
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    reward = add_adapters(AutoModelForSequenceClassification.from_pretrained(task_dir / "models/reward"), LORA)
    trained = [n for n, p in reward.named_parameters() if p.requires_grad]
    assert any(".score." in n for n in trained)
    assert all(".lora_" in n or ".score.modules_to_save." in n for n in trained)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_phi3], ids=["gpt2", "phi3"])
def test_merged_weights_are_the_adapted_model_in_hf_names(make):
    peft_model = perturbed(make())
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        merged = make()
        result = merged.load_state_dict(dict(merged_weights(peft_model)), strict=False)
        assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}  # tied to the embedding
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # out of place: the adapters are still there, and still change the output
    with torch.no_grad(), peft_model.disable_adapter():
        assert not torch.allclose(peft_model(input_ids=ids).logits, want, atol=1e-3)


def test_an_adapter_written_from_its_tensors_loads_with_peft(task_dir, tmp_path):
    from peft import PeftModel

    peft_model = perturbed(AutoModelForCausalLM.from_pretrained(task_dir / "models/policy"))
    write_adapter(tmp_path / "adapter", adapter_config(peft_model), dict(adapter_weights(peft_model)))
    base = AutoModelForCausalLM.from_pretrained(task_dir / "models/policy")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-6)


def lora_learner(task_dir, **cfg) -> PolicyLearner:
    cfg = {"backend": "torch", "micro_batch_size": 3, **cfg}
    path = task_dir / "models/policy"
    out = PolicyLearner(LearnerConfig(**cfg), AlgoConfig(), path, master_port=free_port(), lora=LORA)
    out.setup()
    return out


def test_a_lora_learner_moves_its_adapters_only_and_its_reference_is_the_base_model(task_dir):
    lrn = lora_learner(task_dir, lr=1e-2)
    base = {n: p.detach().clone() for n, p in lrn.engine.module.named_parameters() if not p.requires_grad}
    batch = make_batch(6, seed=5)
    reference = lrn.logprobs(batch)
    assert torch.equal(reference, lrn.compute_logprobs(batch))  # fresh adapters (B = 0): the policy is the base
    lrn.train_step(on_policy(lrn, batch))
    after = dict(lrn.engine.module.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())
    assert not torch.allclose(lrn.compute_logprobs(batch), reference, atol=1e-4)  # the policy moved
    assert torch.equal(lrn.logprobs(batch), reference)  # the reference did not
    frozen = AutoModelForCausalLM.from_pretrained(task_dir / "models/policy")
    assert torch.allclose(reference, policy_logprobs(lrn, frozen, batch), atol=1e-5)


def policy_logprobs(lrn, model, batch: TrainBatch) -> torch.Tensor:
    with torch.no_grad():
        return lrn.layout.logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)


def test_a_lora_learner_exports_a_merged_dir_and_an_adapter_with_the_same_logprobs(task_dir, tmp_path):
    from peft import PeftModel

    lrn = lora_learner(task_dir, lr=1e-2)
    batch = make_batch(6, seed=6)
    lrn.train_step(on_policy(lrn, batch))
    lrn.save_pretrained(tmp_path / "policy", tmp_path / "policy-adapter")
    want = lrn.compute_logprobs(batch)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert torch.allclose(policy_logprobs(lrn, merged, batch), want, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(task_dir / "models/policy")
    adapted = PeftModel.from_pretrained(base, tmp_path / "policy-adapter")
    assert torch.allclose(policy_logprobs(lrn, adapted, batch), want, atol=1e-4)
    config, tensors = lrn.gather_adapter()
    assert config["r"] == 4 and tensors and all(".lora_" in n for n, _ in tensors)


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_a_lora_checkpoint_holds_the_adapters_and_their_optimizer_state(task_dir, tmp_path, backend):
    lrn = lora_learner(task_dir, backend=backend, zero_stage=0, lr=1e-2)
    batch = make_batch(4, seed=7)
    lrn.train_step(on_policy(lrn, batch))
    lrn.save_checkpoint(tmp_path / "ckpt")
    saved = dict(lrn.gather_weights())
    lrn.train_step(on_policy(lrn, batch))
    lrn.load_checkpoint(tmp_path / "ckpt")
    assert lrn.optimizer_steps() == 1
    assert all(torch.equal(w, saved[n]) for n, w in lrn.gather_weights())
    lrn.train_step(on_policy(lrn, batch))
    again = dict(lrn.gather_weights())
    lrn.load_checkpoint(tmp_path / "ckpt")
    lrn.train_step(on_policy(lrn, batch))
    assert all(torch.allclose(w, again[n], rtol=0, atol=1e-7) for n, w in lrn.gather_weights())
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    full = sum(p.numel() * 4 for p in lrn.engine.module.parameters() if not p.requires_grad)
    assert size < full / 2  # the frozen base is not in the checkpoint


def test_the_lora_section_is_checked():
    assert Config().lora.rank == 0 and not Config().base_reference
    assert Config(lora={"rank": 8}).base_reference
    assert not Config(lora={"rank": 8}, reference={"model": "ref"}).base_reference
    with pytest.raises(ValidationError, match="lora.rank.*zero_stage=3"):
        Config(lora={"rank": 8}, learner={"zero_stage": 3})
    with pytest.raises(ValidationError, match="non-empty layer name"):
        LoraConfig(rank=8, target_modules=[])
    with pytest.raises(ValidationError):
        LoraConfig(rank=-1)


def test_lora_stages_choose_where_adapters_train():
    cfg = Config(lora={"rank": 8, "stages": ["rl"]})
    assert cfg.lora_for("rl") is cfg.lora and cfg.lora_for("sft") is None and cfg.base_reference
    cfg = Config(lora={"rank": 8, "stages": ["sft", "rm"]})
    assert cfg.lora_for("rm") is cfg.lora and cfg.lora_for("rl") is None and not cfg.base_reference
    assert Config().lora_for("sft") is None  # rank 0: off everywhere
    with pytest.raises(ValidationError):
        Config(lora={"rank": 8, "stages": ["eval"]})


def test_the_rl_plan_of_a_lora_run_has_no_reference_actors():
    from cluster.plan import plan

    cfg = Config(lora={"rank": 8})
    assert "reference" not in plan(cfg, reference_actors=not cfg.base_reference).roles
    assert "reference" in plan(cfg).roles  # the eval stage still runs its reference worker
