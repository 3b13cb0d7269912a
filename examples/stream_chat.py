"""A terminal chat in a dozen lines of the chatglm API: streamed replies, history, Ctrl-C stops a reply.

    python examples/stream_chat.py [MODEL.gguf]     (no model: the bundled demo model)
"""

import sys

import chatglm

with chatglm.load(sys.argv[1] if len(sys.argv) > 1 else None) as model:
    chat = model.session(system="You are a helpful assistant.")
    for line in sys.stdin:
        try:
            for delta in chat.stream_chat(line.strip() or "Hello!"):
                print(delta, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C ends this reply (it is not kept); the conversation goes on
            pass
        print(f"\n[{model.last_stats.generated_tokens} tokens, {model.last_stats.finish_reason}]", flush=True)
