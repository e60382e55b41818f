"""The speculative-decoding benchmarks' 20 built-in prompts: bench.quality.spec and spec_offline measure on
them, and the head's training keeps them out of the prompts the target writes itself (never trained on)."""
from __future__ import annotations

# General chat requests written for the benchmarks: no overlap with the head's drawn training prompts
# (package docs).
PROMPTS = (
    "Explain how a hash table works and when you would use one.",
    "Write a short poem about the sea at night.",
    "What are the main causes of the seasons on Earth?",
    "Give me three tips for learning a new language.",
    "Describe the water cycle in simple terms.",
    "What is the difference between a virus and a bacterium?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize the story of Little Red Riding Hood.",
    "How do I make a simple tomato pasta sauce?",
    "Why is the sky blue?",
    "List five healthy breakfast ideas.",
    "Explain what a binary search is, step by step.",
    "What should I pack for a weekend hiking trip?",
    "Write a polite email asking my manager for a day off.",
    "How does a bicycle stay upright when it moves?",
    "What are the benefits of regular exercise?",
    "Explain recursion to a ten-year-old.",
    "Tell me a short story about a robot who learns to paint.",
    "What is photosynthesis?",
    "Compare cats and dogs as pets.",
)

