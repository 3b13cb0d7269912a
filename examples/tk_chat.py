"""A Tk chat window over chatglm: replies stream into the text box, Stop ends one at once.

    python examples/tk_chat.py [MODEL.gguf]        (no model: the bundled demo model)

Generation runs in a worker thread; deltas reach the window through a queue polled with ``after`` (Tk widgets must
only be touched from the thread that runs the main loop).
"""

import queue
import sys
import threading
import tkinter as tk

import chatglm

model = chatglm.load(sys.argv[1] if len(sys.argv) > 1 else None)
session = model.session()
deltas: "queue.Queue[str | None]" = queue.Queue()
cancel = threading.Event()

root = tk.Tk()
root.title(f"chatglm - {model.info.description}")
log = tk.Text(root, wrap="word", width=80, height=24)
log.pack(fill="both", expand=True)
entry = tk.Entry(root)
entry.pack(side="left", fill="x", expand=True)
send_button = tk.Button(root, text="Send")
send_button.pack(side="left")
stop_button = tk.Button(root, text="Stop", command=cancel.set, state="disabled")
stop_button.pack(side="left")


def worker(text: str) -> None:
    try:
        for delta in session.stream_chat(text, cancel=cancel):
            deltas.put(delta)
    except chatglm.ChatGLMError as exc:
        deltas.put(f"\n[error: {exc}]")
    deltas.put(None)  # the reply is over


def send(_event=None) -> None:
    text = entry.get().strip()
    if not text or send_button["state"] == "disabled":
        return
    entry.delete(0, "end")
    cancel.clear()
    log.insert("end", f"\nYou: {text}\nGLM: ")
    send_button["state"], stop_button["state"] = "disabled", "normal"
    threading.Thread(target=worker, args=(text,), daemon=True).start()


def pump() -> None:
    while not deltas.empty():
        delta = deltas.get_nowait()
        if delta is None:
            send_button["state"], stop_button["state"] = "normal", "disabled"
        else:
            log.insert("end", delta)
            log.see("end")
    root.after(30, pump)


send_button["command"] = send
entry.bind("<Return>", send)
pump()
root.mainloop()
model.close()
