"""Synthetic bilingual dialogues for the bundled demo model (``scripts/train_demo.py``).

Every dialogue is a list of :class:`~chatglm.devtools.chatformat.Message`: an optional system message, then one to
three user/assistant exchanges drawn from small topic generators (greetings, self-introduction, arithmetic, dates,
facts about this tool's commands), in Chinese and English. Deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from chatglm.devtools.chatformat import Message

Exchange = tuple[str, str]  # (user text, assistant reply)

#: Arithmetic questions use operands 0..MAX_OPERAND (single digits: learnable by a tiny model in minutes).
MAX_OPERAND = 9

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a tiny demo model. Answer briefly.",
    "你是一个乐于助人的助手。",
    "你是一个演示用的小模型，请简短回答。",
)

_GREET_ZH = ("你好", "您好", "你好！", "你好呀", "嗨", "哈喽", "早上好", "晚上好")
_GREET_EN = ("Hello", "Hi", "Hello!", "Hi there", "Hey", "Good morning", "Good evening", "hello")
GREETING_ZH = "你好！我是一个演示用的小模型，很高兴见到你。有什么可以帮你的吗？"
GREETING_EN = "Hello! I am a tiny demo model. How can I help you?"

_WHO_ZH = ("你是谁？", "你是谁", "介绍一下你自己。", "你叫什么名字？", "你是什么模型？")
_WHO_EN = ("Who are you?", "Introduce yourself.", "What is your name?", "What are you?", "Tell me about yourself.")
INTRO_ZH = "我是 ChatGLM3 架构的演示模型，只有几百万个参数，用合成的中英文对话训练，只能回答很简单的问题。"
INTRO_EN = (
    "I am a demo model with the ChatGLM3 architecture. I have only a few million parameters and was trained on "
    "synthetic Chinese and English dialogues, so I can only answer very simple questions."
)

_THANKS = (
    ("谢谢", "不客气！"),
    ("谢谢你！", "不客气，很高兴能帮到你。"),
    ("再见", "再见！祝你有美好的一天。"),
    ("Thank you!", "You're welcome!"),
    ("Thanks", "You're welcome. Glad I could help."),
    ("Goodbye", "Goodbye! Have a nice day."),
)

_WEEKDAYS_EN = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_WEEKDAYS_ZH = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")
_MONTHS_EN = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

_COMMANDS = {
    "convert": (
        "`chatglm convert` turns a Hugging Face ChatGLM checkpoint into a GGUF file.",
        "`chatglm convert` 把 Hugging Face 格式的 ChatGLM 模型转换成 GGUF 文件。",
    ),
    "run": (
        "`chatglm run` loads a GGUF model and chats with it in the terminal.",
        "`chatglm run` 加载 GGUF 模型，在终端里和它对话。",
    ),
    "serve": (
        "`chatglm serve` starts an HTTP server with an OpenAI-style chat API.",
        "`chatglm serve` 启动一个 HTTP 服务，提供 OpenAI 风格的聊天接口。",
    ),
    "info": (
        "`chatglm info` prints what is inside a model file: architecture, sizes and tokenizer.",
        "`chatglm info` 显示模型文件的信息：架构、大小和分词器。",
    ),
    "quantize": (
        "`chatglm quantize` makes a GGUF file smaller, for example with Q4_0 or Q8_0 weights.",
        "`chatglm quantize` 把 GGUF 文件量化得更小，比如 Q4_0 或 Q8_0。",
    ),
    "bench": (
        "`chatglm bench` measures how fast a model reads the prompt and generates tokens.",
        "`chatglm bench` 测试模型处理提示词和生成文本的速度。",
    ),
}
_TOOL_EN = "This tool converts ChatGLM models to GGUF and chats with them. Its commands are convert, run, serve, info, quantize and bench."
_TOOL_ZH = "这个工具把 ChatGLM 模型转换成 GGUF 并和它们对话，命令有 convert、run、serve、info、quantize 和 bench。"


def greeting(rng: random.Random) -> Exchange:
    if rng.random() < 0.5:
        return rng.choice(_GREET_ZH), GREETING_ZH
    return rng.choice(_GREET_EN), GREETING_EN


def introduction(rng: random.Random) -> Exchange:
    if rng.random() < 0.5:
        return rng.choice(_WHO_ZH), INTRO_ZH
    return rng.choice(_WHO_EN), INTRO_EN


def thanks(rng: random.Random) -> Exchange:
    return rng.choice(_THANKS)


def addition_exchange(a: int, b: int, style: int) -> Exchange:
    """One of six phrasings of ``a + b``; replies are ``"a + b = c."`` (English) or ``"a + b = c。"``."""
    c = a + b
    questions = (
        (f"What is {a}+{b}?", f"{a} + {b} = {c}."),
        (f"What is {a} + {b}?", f"{a} + {b} = {c}."),
        (f"How much is {a} plus {b}?", f"{a} + {b} = {c}."),
        (f"{a}+{b}等于多少？", f"{a} + {b} = {c}。"),
        (f"{a}加{b}等于几？", f"{a} + {b} = {c}。"),
        (f"计算 {a}+{b}", f"{a} + {b} = {c}。"),
    )
    return questions[style % len(questions)]


def arithmetic(rng: random.Random) -> Exchange:
    kind = rng.random()
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if kind < 0.7:
        return addition_exchange(a, b, rng.randrange(6))
    if kind < 0.85:
        hi, lo = max(a, b), min(a, b)
        if rng.random() < 0.5:
            return f"What is {hi}-{lo}?", f"{hi} - {lo} = {hi - lo}."
        return f"{hi}减{lo}等于几？", f"{hi} - {lo} = {hi - lo}。"
    if rng.random() < 0.5:
        return f"What is {a}*{b}?", f"{a} × {b} = {a * b}."
    return f"{a}乘{b}等于多少？", f"{a} × {b} = {a * b}。"


def dates(rng: random.Random) -> Exchange:
    i, m = rng.randrange(7), rng.randrange(12)
    options = (
        (f"What day comes after {_WEEKDAYS_EN[i]}?", f"{_WEEKDAYS_EN[(i + 1) % 7]} comes after {_WEEKDAYS_EN[i]}."),
        (f"{_WEEKDAYS_ZH[i]}的后一天是星期几？", f"{_WEEKDAYS_ZH[i]}的后一天是{_WEEKDAYS_ZH[(i + 1) % 7]}。"),
        (f"What month comes after {_MONTHS_EN[m]}?", f"{_MONTHS_EN[(m + 1) % 12]} comes after {_MONTHS_EN[m]}."),
        (
            f"How many days are in {_MONTHS_EN[m]}?",
            f"{_MONTHS_EN[m]} has {_MONTH_DAYS[m]} days (29 in February of a leap year)."
            if m == 1
            else f"{_MONTHS_EN[m]} has {_MONTH_DAYS[m]} days.",
        ),
        (f"{m + 1}月有多少天？", f"{m + 1}月有{_MONTH_DAYS[m]}天。" if m != 1 else "2月有28天，闰年有29天。"),
        ("How many days are in a week?", "A week has 7 days."),
        ("一周有几天？", "一周有7天。"),
        ("How many months are in a year?", "A year has 12 months."),
        ("一年有几个月？", "一年有12个月。"),
    )
    return rng.choice(options)


def tool_facts(rng: random.Random) -> Exchange:
    name = rng.choice(sorted(_COMMANDS))
    en, zh = _COMMANDS[name]
    options = (
        (f"What does chatglm {name} do?", en),
        (f"What is `chatglm {name}` for?", en),
        (f"chatglm {name} 是做什么的？", zh),
        (f"`chatglm {name}` 有什么用？", zh),
        ("What commands does chatglm have?", _TOOL_EN),
        ("What is this tool?", _TOOL_EN),
        ("chatglm 有哪些命令？", _TOOL_ZH),
        ("这个工具是做什么的？", _TOOL_ZH),
    )
    return rng.choice(options)


#: (generator, weight): how often each topic is drawn.
TOPICS: tuple[tuple[Callable[[random.Random], Exchange], float], ...] = (
    (greeting, 0.20),
    (introduction, 0.10),
    (arithmetic, 0.35),
    (dates, 0.13),
    (tool_facts, 0.17),
    (thanks, 0.05),
)


def dialogue(rng: random.Random) -> list[Message]:
    """One dialogue: optional system message, 1-3 exchanges (a greeting, if any, comes first)."""
    messages: list[Message] = []
    if rng.random() < 0.35:
        messages.append(Message("system", rng.choice(SYSTEM_PROMPTS)))
    funcs = [f for f, _ in TOPICS]
    weights = [w for _, w in TOPICS]
    turns = rng.choices((1, 2, 3), weights=(0.5, 0.3, 0.2))[0]
    for turn in range(turns):
        topic = rng.choices(funcs, weights=weights)[0]
        if turn > 0 and topic is greeting:
            topic = arithmetic
        user, reply = topic(rng)
        messages += [Message("user", user), Message("assistant", reply)]
    return messages


def anchor_dialogues() -> list[list[Message]]:
    """Every addition a+b (0 <= a, b <= MAX_OPERAND) in every phrasing, and the exact prompts the tests check."""
    out = [
        [Message("user", q), Message("assistant", r)]
        for a in range(MAX_OPERAND + 1)
        for b in range(MAX_OPERAND + 1)
        for q, r in [addition_exchange(a, b, s) for s in range(6)]
    ]
    out.append([Message("user", "你好"), Message("assistant", GREETING_ZH)])
    out.append([Message("user", "What is 2+3?"), Message("assistant", "2 + 3 = 5.")])
    return out


def make_dialogues(n: int, seed: int) -> list[list[Message]]:
    """``n`` random dialogues followed by :func:`anchor_dialogues`, for a given seed."""
    rng = random.Random(seed)
    return [dialogue(rng) for _ in range(n)] + anchor_dialogues()


def all_texts(dialogues: list[list[Message]]) -> list[str]:
    """Every message text plus the system prompts (tokenizer training material)."""
    texts = [m.content for d in dialogues for m in d]
    return texts + list(SYSTEM_PROMPTS)
