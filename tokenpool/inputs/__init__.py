"""Prompt types and prompt -> token id processing."""

from tokenpool.inputs.data import PromptType, TextPrompt, TokensPrompt

__all__ = ["PromptType", "TextPrompt", "TokensPrompt"]
