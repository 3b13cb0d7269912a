"""Short names for the families we know, and the official Hugging Face repositories they stand for (`chatglm pull
--list-known`). The one table: `chatglm pull glm-4-9b-chat` and a store lookup of `glm-4-9b-chat` both read it."""

from __future__ import annotations

KNOWN = {  # short name -> repository (THUDM's repositories moved to zai-org; the hub redirects the old names)
    "chatglm-6b": "THUDM/chatglm-6b",
    "chatglm2-6b": "THUDM/chatglm2-6b",
    "chatglm3-6b": "THUDM/chatglm3-6b",
    "codegeex2-6b": "THUDM/codegeex2-6b",
    "glm-4-9b-chat": "THUDM/glm-4-9b-chat",
    "glm-4-9b-chat-hf": "THUDM/glm-4-9b-chat-hf",
    "glm-edge-1.5b-chat": "THUDM/glm-edge-1.5b-chat",
    "glm-edge-4b-chat": "THUDM/glm-edge-4b-chat",
    "glm-4-9b-0414": "THUDM/GLM-4-9B-0414",
    "glm-4-32b-0414": "THUDM/GLM-4-32B-0414",
    "glm-z1-9b-0414": "THUDM/GLM-Z1-9B-0414",
    "glm-4.1v-9b-thinking": "THUDM/GLM-4.1V-9B-Thinking",
    "glm-4.5-air": "zai-org/GLM-4.5-Air",
    "glm-4.5": "zai-org/GLM-4.5",
    "glm-4.6": "zai-org/GLM-4.6",
    "glm-4.6v-flash": "zai-org/GLM-4.6V-Flash",
    "glm-4.7": "zai-org/GLM-4.7",
    "glm-4.7-flash": "zai-org/GLM-4.7-Flash",
    "glm-asr-nano": "zai-org/GLM-ASR-Nano-2512",
}


def repo_of(name: str) -> str:
    """The repository a short name stands for (case-insensitive), else the name itself."""
    return KNOWN.get(name.lower(), name)
