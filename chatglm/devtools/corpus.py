"""A small, deterministic bilingual text corpus for tokenizer tests and tiny-tokenizer training.

The lines are written for this project. They cover what a ChatGLM tokenizer must survive: Chinese, English and mixed
sentences, source code with indentation and tabs, runs of spaces, newlines inside a line, digits, ASCII and full-width
punctuation, emoji, and (in :data:`RARE_LINES`) characters from scripts that a tokenizer trained on
:func:`training_texts` has never seen, so they can only be encoded through byte fallback.
"""

from __future__ import annotations

CHINESE_LINES: tuple[str, ...] = (
    "你好，世界！",
    "今天天气很好，我们去公园散步吧。",
    "这是一个用于测试分词器的小语料库。",
    "模型转换完成后，可以在命令行里直接对话。",
    "请把这段文字翻译成英文。",
    "北京是中国的首都，上海是最大的城市之一。",
    "春眠不觉晓，处处闻啼鸟。",
    "夜来风雨声，花落知多少。",
    "床前明月光，疑是地上霜。",
    "学而时习之，不亦说乎？",
    "他说：“明天见！”然后就走了。",
    "《红楼梦》是中国古典小说的代表作。",
    "数据、模型和算力是人工智能的三要素。",
    "量化可以减少显存占用，但会带来一点精度损失。",
    "我们用 SentencePiece 训练了一个很小的词表。",
    "如果出现错误，请检查输入文件的路径。",
    "第一步：下载模型；第二步：转换格式；第三步：开始聊天。",
    "这个问题的答案是四十二。",
    "小明有三个苹果，小红又给了他两个。",
    "一二三四五六七八九十百千万亿",
    "零点五加零点五等于一。",
    "中文标点符号：，。！？；：“”‘’（）【】《》、……——",
    "请问现在几点了？",
    "谢谢你的帮助，祝你有美好的一天。",
    "对不起，我不太明白你的意思。",
    "长江和黄河是中国最长的两条河流。",
    "计算机只认识零和一。",
    "写代码之前，先想清楚要解决什么问题。",
    "测试要快，而且每次结果都一样。",
    "乘风破浪会有时，直挂云帆济沧海。",
)

ENGLISH_LINES: tuple[str, ...] = (
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "This corpus is small, deterministic and written by hand.",
    "Convert the checkpoint first, then run the model.",
    "It's a test; don't worry — nothing here is real.",
    "What is 2+3? The answer is 5.",
    "Tokenizers split text into pieces, and pieces into ids.",
    'She said: "Quantization trades accuracy for memory."',
    "Numbers like 3.14159, 2.71828 and 1,000,000 appear often.",
    "Email me at someone@example.com or visit https://example.org/path?q=1&r=2.",
    "UPPER CASE, lower case, and MiXeD cAsE words.",
    "A list: apples, oranges, pears; and (in brackets) plums.",
    "The year 2023 had 365 days; 2024 had 366.",
    "Keep tests fast: under a second each, if possible.",
    "Rotary embeddings rotate pairs of dimensions by a position-dependent angle.",
    "Attention is computed over keys and values from every earlier position.",
    "GPUs are fast, but this model runs fine on a CPU.",
    "Don't panic.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "The meeting is at 09:30 on 2024-05-17, room 101.",
)

MIXED_LINES: tuple[str, ...] = (
    "我喜欢用 Python 写脚本，也喜欢 C 语言。",
    "ChatGLM3 是一个中英双语对话模型。",
    "运行 `chatglm convert model/ out.gguf` 就可以转换模型。",
    "版本号是 v0.1.0，发布于 2024 年 5 月。",
    "温度设置为 0.7，top_p 设置为 0.9。",
    "GPU 显存不足时，可以试试 Q4_0 量化。",
    "用户说 “Hi”，助手回答 “你好”。",
    "文件大小约为 12.5 MB（兆字节）。",
    '这个 API 返回 JSON 格式的数据：{"ok": true}。',
    "Transformer 模型由 attention 和 MLP 组成。",
    "上下文长度 context length 为 8192 个 token。",
    "Hello 你好 Bonjour 안녕 こんにちは",
    "中文English混排without空格也要能处理。",
    "价格：￥99.00，或者 $13.99。",
    "１２３４５６７８９０ 是全角数字，ＡＢＣ 是全角字母。",
)

CODE_LINES: tuple[str, ...] = (
    "def add(a, b):\n    return a + b",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)",
    "    # indented comment with four leading spaces",
    "        return {\"key\": [1, 2, 3], 'other': None}",
    'int main(void) {\n\tprintf("hello\\n");\n\treturn 0;\n}',
    "#include <stdio.h>\n#include <stdlib.h>",
    "static inline float silu(float x) { return x / (1.0f + expf(-x)); }",
    "\tif (n < 0) {\n\t\treturn -1;\n\t}",
    "while (i < n && buf[i] != '\\0') i++;",
    "x = [i * i for i in range(100) if i % 3 == 0]",
    "SELECT name, age FROM users WHERE age >= 18 ORDER BY name;",
    '$ chatglm run models/demo --prompt "你好"',
    '{\n  "hidden_size": 4096,\n  "num_layers": 28\n}',
    "a  b   c    d     e      f",
    "    \t    mixed\t\ttabs\tand    spaces",
    "line one\nline two\n\nline four after a blank line",
    "trailing spaces   ",
    "   leading spaces",
    "key:\tvalue\nother_key:\tother value",
    'if __name__ == "__main__":\n    main()',
    "return (a<<2) | (b>>1) ^ ~c;",
    "// C++ style comment\n/* block comment */",
    'print(f"{name!r:>10} = {value:.3f}")',
)

SYMBOL_LINES: tuple[str, ...] = (
    "😀😃😄 emoji in a row 🎉🚀",
    "我很开心😊，你呢？🤔",
    "Thumbs up 👍🏽 with a skin tone, and a family 👨‍👩‍👧.",
    "Math: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ ± × ÷",
    "Arrows → ← ↑ ↓ ⇒ and bullets • ◦ ▪",
    "Currency: € £ ¥ ₩ ₹ ¢",
    "Quotes: «guillemets» „low“ ‘single’ “double”",
    "Accents: café, naïve, résumé, über, señor, Ångström",
    "1+1=2, 2*3=6, 10/4=2.5, 7-9=-2, 2^10=1024",
    "!@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "……   ——   ～～～",
    "Ｆｕｌｌ－ｗｉｄｔｈ ｔｅｘｔ！",
    "0x1F 0b1010 0o777 1e-5 6.02e23",
    "Version 3.10.12, build 20240517-rc1",
    "...",
)

#: Lines whose characters should be absent from a tokenizer trained on :func:`training_texts`.
RARE_LINES: tuple[str, ...] = (
    "𠀀𠀁𠀂 are CJK Extension B characters.",
    "罕见字：龘靐齉爩",
    "Ελληνικά: Καλημέρα κόσμε",
    "Русский: Привет, мир!",
    "עברית: שלום עולם",
    "العربية: مرحبا بالعالم",
    "हिन्दी: नमस्ते दुनिया",
    "ไทย: สวัสดีชาวโลก",
    "ქართული: გამარჯობა",
    "Ethiopic: ሰላም ዓለም",
    "Symbols: ☃ ☂ ♞ ⚙ ✈",
    "Old Italic: 𐌀𐌁𐌂, Gothic: 𐌰𐌱𐌲",
    "Mahjong tiles: 🀄🀅🀆",
    "Control-ish: \u00a0non-breaking\u00a0space and \u2009thin space",
    "Combining: e\u0301 a\u0308 n\u0303",
)


def _generated_lines() -> list[str]:
    """Deterministic templated lines: arithmetic, dates, counters and indentation depths."""
    lines: list[str] = []
    for a, b in ((2, 3), (7, 8), (12, 30), (99, 1), (123, 456), (5, 5)):
        lines.append(f"{a} + {b} = {a + b}")
        lines.append(f"{a} 加 {b} 等于 {a + b}。")
    for month, day in ((1, 1), (5, 17), (10, 1), (12, 31)):
        lines.append(f"2024年{month}月{day}日")
        lines.append(f"Date: 2024-{month:02d}-{day:02d}")
    for depth in range(1, 6):
        lines.append(" " * (4 * depth) + f"level_{depth} = {depth}")
        lines.append("\t" * depth + f"tab_level_{depth}")
    for n in (0, 7, 42, 1000, 65024, 3141592653):
        lines.append(f"id={n}\tcount={n * 2}\tratio={n / 7:.4f}")
    return lines


def training_texts() -> list[str]:
    """Every corpus line except :data:`RARE_LINES`: what a tiny test tokenizer is trained on."""
    return [
        *CHINESE_LINES,
        *ENGLISH_LINES,
        *MIXED_LINES,
        *CODE_LINES,
        *SYMBOL_LINES,
        *_generated_lines(),
    ]


def bilingual_corpus() -> list[str]:
    """All lines, rare-script ones last; the same list on every call."""
    return [*training_texts(), *RARE_LINES]
