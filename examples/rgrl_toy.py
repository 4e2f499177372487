"""RGRL the way TRL's GRPOTrainer quick start reads, in rgrl's toy world: a CPU run of a few minutes.

    python examples/rgrl_toy.py [--max_steps 40] [--guidance_method aps] [any other RGRLConfig field]

The policy is given by name ("toy:dream": rgrl's toy Dream dLLM; a Hub id such as "Dream-org/Dream-v0-Instruct-7B"
or a local folder works the same), the reward functions mix a reward model by name ("toy:rm", which also guides
the rollouts) with a plain Python function, and LoRA comes from a peft config (its targets default to the family's
projections). Rollout and guidance settings are fields of RGRLConfig.
"""

from peft import LoraConfig
from transformers import HfArgumentParser

from rgrl.data import PromptDataConfig, load_prompts
from rgrl.toy.world import parse_instruction
from rgrl.trainers import RGRLConfig, RGRLTrainer

dataset = load_prompts(PromptDataConfig(source="toy"))  # 300 chat prompts: "Describe the sea using the word coin"


def uses_the_word(prompts, completions, **kwargs):
    """1.0 when the completion uses the word its prompt asks for (TRL's reward-function convention)."""
    words = [parse_instruction(prompt).word for prompt in prompts]
    texts = [completion[-1]["content"] for completion in completions]
    return [float(word in text.split()) for word, text in zip(words, texts)]


parser = HfArgumentParser(RGRLConfig)
parser.set_defaults(
    output_dir="outputs/example_rgrl", max_steps=40, learning_rate=3e-4, lr_scheduler_type="constant",
    per_device_train_batch_size=16, num_generations=4, bf16=False, activation_checkpointing=False,
    p_mask_prompt=0.0, logging_steps=1, report_to="none", dataloader_pin_memory=False,
    # the toy dLLM's rollouts: T = L = 16 with the paper's test-time sampler; guidance M = 1, η = 0.5
    diffusion_steps=16, max_completion_length=16, schedule="dream", temperature=0.7, top_k=0, deprioritize_eos=True,
    guidance_method="entrgi", guidance_steps=1, guidance_lr=0.5,
)
(training_args,) = parser.parse_args_into_dataclasses()

trainer = RGRLTrainer(
    model="toy:dream",
    reward_funcs=["toy:rm", uses_the_word],
    args=training_args,
    train_dataset=dataset,
    peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1),
)
trainer.train()
trainer.save_model(training_args.output_dir)
