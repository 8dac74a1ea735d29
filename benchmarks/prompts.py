"""The benchmarks' shared workload: story prompts of ~32 tokens (no heavy imports)."""

TOPICS = [
    "a lighthouse keeper", "a lost robot", "the last dragon", "a city under the sea", "a time traveller",
    "a haunted library", "a desert caravan", "a mountain monastery", "a clockwork bird", "a pirate queen",
    "a forgotten moon base", "a talking river", "a royal chef", "an arctic expedition", "a circus of ghosts",
    "a garden on Mars",
]  # fmt: skip
TEMPLATE = (
    "Write a long, detailed story about {}. Give it vivid scenes, three named characters "
    "and a lot of dialogue. Begin:"
)


def prompt_texts(n: int) -> list[str]:
    return [TEMPLATE.format(TOPICS[i % len(TOPICS)]) for i in range(n)]
