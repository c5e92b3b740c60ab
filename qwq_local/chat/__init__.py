"""The conversation layer, pure Python: messages in OpenAI's shapes -> the prompt text QwQ was
trained on (its Jinja template in a sandbox), and model text -> thought, answer and tool calls.
"""

from __future__ import annotations

from .messages import normalize_messages, content_text
from .template import ChatTemplate, render_prompt, select_template, prepare_messages, tool_schemas
from .reasoning import ThinkingSplitter, split_thinking, parse_tool_calls

__all__ = ["normalize_messages", "content_text", "ChatTemplate", "render_prompt", "select_template", "prepare_messages", "tool_schemas", "ThinkingSplitter", "split_thinking", "parse_tool_calls"]
