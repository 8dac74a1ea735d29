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


FILLER = [
    "harbor", "lantern", "copper", "meadow", "whisper", "granite", "velvet", "orchard", "thunder", "pebble",
    "saffron", "glacier", "compass", "ember", "willow", "quartz", "falcon", "midnight", "canyon", "marble",
]  # fmt: skip


def unique_prompt_texts(n: int, run_id: str, extra_words: int = 0) -> list[str]:
    """`prompt_texts` made unique per request (and per run): a tag first, so no two requests share a
    prefix-cache block, then `extra_words` words of filler for prefill-heavy loads."""
    prompts = []
    for i, text in enumerate(prompt_texts(n)):
        filler = " ".join(FILLER[(i + j * 7) % len(FILLER)] for j in range(extra_words))
        prompts.append(f"[{run_id}-{i}] {filler + ' ' if filler else ''}{text}")
    return prompts


def shared_header(words: int) -> str:
    """A fixed header of `words` words, the same in every run: a deployment's long system prompt."""
    return " ".join(FILLER[(j * 7 + j // len(FILLER)) % len(FILLER)] for j in range(words))


def shared_prefix_prompt_texts(n: int, run_id: str, prefix_words: int, extra_words: int = 0) -> list[str]:
    """`unique_prompt_texts` behind one shared header of `prefix_words` words: every request starts with
    the same tokens (a prefix cache can serve them), and differs from its tag on."""
    header = shared_header(prefix_words)
    return [f"{header}\n{text}" for text in unique_prompt_texts(n, run_id, extra_words)]
