"""Why did the model say that? Per-token explanations of one text, as a self-contained HTML page.

- A language model (`explain_lm`): each token's surprisal, -ln p(token | the tokens before it), in nats: the same
  numbers whose mean `owngpt eval` reports as the loss of that text; and the attention weights of every layer and
  head (a heatmap of one chosen head, plus a small picture of all of them). transformers 5 returns attention weights
  only from the "eager" attention implementation (SDPA and flash kernels never materialise them), so the model is
  loaded with attn_implementation="eager".
- A classifier (`explain_classifier`): the predicted label with its probability, and each token's attribution to
  that probability by integrated gradients (Sundararajan et al. 2017) on the token embeddings, computed with Captum
  (`LayerIntegratedGradients`), the maintained PyTorch library for it. The baseline replaces every ordinary token by
  the pad token and keeps special tokens (the EOS the head reads), the usual choice for text. Completeness, the
  property that makes the numbers readable: the attributions sum to p(label | text) - p(label | baseline); the page
  shows both sides, and the tests check them against a forward pass made without Captum.

Tokens are shown as the text they stand for. A byte-level BPE token can hold part of a character (a Chinese
character is often 2-3 byte tokens): such a token shows nothing and the character is shown on the token that
completes it, so the pieces always join up to the text (`token_pieces`).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from owngpt import atomic
from owngpt.checkpoint import DEFAULT_CONTEXT, Checkpoint, open_checkpoint, position_table
from owngpt.errors import ConfigError, DataError, require
from owngpt.predict import load_classifier
from owngpt.tasks.classify import classifier_logits, encode_texts

MAX_HEATMAP_TOKENS = 96  # the attention table gets unreadable (and heavy) beyond this; the overview has all


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds, decoding prefixes so that byte-level pieces of one character are not shown as �.

    ''.join(pieces) == tokenizer.decode(ids) (when the decode ends on a whole character).
    """
    pieces: list[str] = []
    shown = ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        stable = text.rstrip("\ufffd") if i + 1 < len(ids) else text  # an unfinished character: wait for its bytes
        if stable.startswith(shown):
            pieces.append(stable[len(shown) :])
            shown = stable
        elif i + 1 < len(ids) and text.endswith("\ufffd"):
            # byte-fallback decoders turn a whole run of byte tokens into � while it is not valid UTF-8, complete
            # characters before the unfinished one included: wait until the run decodes
            pieces.append("")
        else:  # the decoder rewrote earlier text (rare: e.g. cleanup of spaces); show this token on its own
            pieces.append(tokenizer.decode([ids[i]], skip_special_tokens=False))
            shown = text
    return pieces


def explain_lm(ckpt: str | Any, text: str) -> dict[str, Any]:
    """Surprisal per token and attention weights (layers, heads, T, T) of a causal LM on `text` (`ckpt`: a spec or
    an opened owngpt.checkpoint.Checkpoint)."""
    import numpy as np
    import torch

    c = ckpt if isinstance(ckpt, Checkpoint) else open_checkpoint(ckpt)
    path = c.path
    tok = c.tokenizer()
    model = c.model(attn_implementation="eager").eval()
    # the same ids `owngpt eval` scores for this text (a plain text file is encoded without special tokens)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    context = position_table(model.config) or DEFAULT_CONTEXT
    if len(ids) < 2:
        raise DataError("--text: give at least two tokens of text: the first token has no prediction to score")
    truncated = len(ids) > context
    ids = ids[:context]
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False, output_attentions=True)
    logp = torch.log_softmax(out.logits[0].float(), -1)
    target = torch.tensor(ids[1:])
    s = (-logp[:-1].gather(1, target[:, None])[:, 0]).numpy().astype(np.float64)
    surprisal = [None] + [float(v) for v in s]
    att = out.attentions
    if not att or att[0] is None:
        raise ConfigError(f"{path}: the model returned no attention weights (its attention implementation)")
    attn = np.stack([a[0].float().numpy() for a in att])  # (L, H, T, T)
    return {
        "kind": "lm",
        "checkpoint": str(path),
        "text": text,
        "ids": list(ids),
        "pieces": token_pieces(tok, ids),
        "surprisal": surprisal,  # nats; None for the first token
        "mean_surprisal": float(s.mean()),
        "attentions": attn,
        "truncated": truncated,
    }


def explain_classifier(ckpt: str | Any, text: str, n_steps: int = 64, target: str | None = None) -> dict[str, Any]:
    """Predicted label, probabilities and integrated-gradients attribution of each token (Captum)."""
    import torch

    captum_attr = require("captum.attr", "explain")
    clf = load_classifier(ckpt)
    model = clf.model
    ids = encode_texts(clf.tokenizer, [text], clf.max_length)[0]
    x = torch.tensor([ids])
    special = set(clf.tokenizer.all_special_ids)
    pad = clf.tokenizer.pad_token_id
    baseline = torch.tensor([[i if i in special else pad for i in ids]])

    def probs(input_ids: torch.Tensor) -> torch.Tensor:  # (B, K); the mask is all ones: one unpadded text
        return torch.softmax(classifier_logits(model, input_ids, torch.ones_like(input_ids)).float(), -1)

    with torch.no_grad():
        p = probs(x)[0]
    k = clf.labels.index(target) if target is not None else int(p.argmax())
    if target is not None and target not in clf.labels:
        raise ConfigError(f"--target {target}: the model's labels are {', '.join(clf.labels)}")
    lig = captum_attr.LayerIntegratedGradients(probs, model.get_input_embeddings())
    # Captum's own convergence delta is not used: it runs the model on the baseline *ids*, which moves GPT-2's
    # readout position (the head pools the last non-pad token); the baseline here is the embedding-layer output,
    # with the readout where the text's is, and completeness is checked against that (probs_with_embeddings).
    attr = lig.attribute(x, baselines=baseline, target=k, n_steps=n_steps, internal_batch_size=16)
    scores = attr[0].sum(-1).detach().double().numpy()  # (T,): each token's share of p(label) - p(label | baseline)
    with torch.no_grad():
        base_emb = model.get_input_embeddings()(baseline)
    p_base = float(probs_with_embeddings(model, x, base_emb, probs)[0, k])
    delta = float(scores.sum()) - (float(p[k]) - p_base)
    return {
        "kind": "classify",
        "checkpoint": str(clf.path),
        "text": text,
        "ids": list(ids),
        "pieces": token_pieces(clf.tokenizer, ids),
        "labels": list(clf.labels),
        "probs": [float(v) for v in p],
        "target": clf.labels[k],
        "prob": float(p[k]),
        "baseline_prob": p_base,
        "attributions": [float(v) for v in scores],
        "delta": delta,  # sum of attributions - (prob - baseline_prob): the integration error
        "n_steps": n_steps,
    }


def probs_with_embeddings(model: Any, input_ids: Any, embeddings: Any, probs: Any) -> Any:
    """probs(input_ids) with the token-embedding layer's output replaced by `embeddings`: the baseline's output, as
    integrated gradients defines it (the head still pools by the real ids), computed without Captum."""
    import torch

    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, _o: embeddings)
    try:
        with torch.no_grad():
            return probs(input_ids)
    finally:
        handle.remove()


# --- HTML ---------------------------------------------------------------------------------------------------------
_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI","Noto Sans","PingFang SC","Microsoft YaHei",sans-serif;
max-width:1100px;margin:2em auto;padding:0 1em;color:#1d1d1f}
.tokens{font:16px/2.1 ui-monospace,"SFMono-Regular",Menlo,Consolas,"Noto Sans Mono CJK SC",monospace;
white-space:pre-wrap;word-break:break-word;border:1px solid #eee;padding:.6em}
.tok{border-radius:3px;padding:1px 0;border-right:1px solid rgba(0,0,0,.08)}
.tok.empty{display:inline-block;width:3px;background:#bbb}
table.attn{border-collapse:collapse;font-size:11px}table.attn td{width:14px;height:14px;padding:0}
table.attn th{font-weight:normal;font-family:ui-monospace,monospace;padding:0 3px;white-space:pre}
table.attn th.col{writing-mode:vertical-rl;height:auto}
table.kv td,table.kv th{border:1px solid #e3e3e3;padding:2px 8px;text-align:left}table.kv{border-collapse:collapse}
.muted{color:#666}.legend span{padding:2px 6px;margin-right:4px;border-radius:3px}
img{max-width:100%}
"""


# the page's words in English and Chinese (--lang)
_TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "lm_title": "Explanation: language model",
        "surprisal": "Surprisal of each token",
        "surprisal_help": "Colour: -ln p(token | the text before it), in nats, redder = more surprising (hover for "
        "the value). The mean is the loss <code>owngpt eval</code> reports for this text.",
        "tokens": "tokens",
        "mean_surprisal": "mean surprisal (nats/token)",
        "perplexity": "perplexity",
        "most_surprising": "most surprising",
        "attention": "Attention: layer {layer}, head {head}",
        "attention_help": "Row = the token attending, column = the token attended to (hover for the weight). "
        "Choose another with --layer and --head.",
        "cut": " Only the first {n} tokens are drawn.",
        "all_heads": "All heads",
        "all_heads_help": "Every layer (rows) and head (columns), the same rows and columns as above.",
        "truncated": "The text was longer than the model's context: only its beginning was scored.",
        "cls_title": "Explanation: classifier",
        "predicted": "predicted",
        "probability": "probability",
        "why": "Why: each token's attribution",
        "why_help": "Integrated gradients ({steps} steps, Captum) on the token embeddings, towards p({target}). "
        "Green raised it, red lowered it; hover for the value. The baseline is the same text with every token "
        "replaced by the pad token (special tokens kept).",
        "raises": "raises",
        "lowers": "lowers",
        "completeness": "Completeness",
        "sum": "sum of attributions",
        "text": "text",
        "baseline": "baseline",
        "error": "difference (integration error)",
        "strongest": "Strongest tokens",
    },
    "zh": {
        "lm_title": "解释：语言模型",
        "surprisal": "每个 token 的惊奇度",
        "surprisal_help": "颜色：-ln p(token | 前文)，单位 nats，越红越出乎模型意料（悬停可看数值）。"
        "平均值就是 <code>owngpt eval</code> 对这段文本给出的损失。",
        "tokens": "token 数",
        "mean_surprisal": "平均惊奇度（nats/token）",
        "perplexity": "困惑度",
        "most_surprising": "最出乎意料",
        "attention": "注意力：第 {layer} 层，第 {head} 个头",
        "attention_help": "行 = 发出注意力的 token，列 = 被关注的 token（悬停可看权重）。用 --layer 和 --head 选择其他层和头。",
        "cut": "只画出前 {n} 个 token。",
        "all_heads": "所有注意力头",
        "all_heads_help": "每一层（行）和每个头（列），行列含义同上。",
        "truncated": "文本超过了模型的上下文长度：只评估了开头部分。",
        "cls_title": "解释：分类模型",
        "predicted": "预测",
        "probability": "概率",
        "why": "原因：每个 token 的贡献",
        "why_help": "在词嵌入上计算积分梯度（{steps} 步，Captum），目标是 p({target})。绿色表示提高、红色表示降低该概率；"
        "悬停可看数值。基线是把每个普通 token 换成填充 token 的同一段文本（特殊 token 保留）。",
        "raises": "提高",
        "lowers": "降低",
        "completeness": "完备性",
        "sum": "贡献之和",
        "text": "文本",
        "baseline": "基线",
        "error": "差值（积分误差）",
        "strongest": "贡献最大的 token",
    },
}


def _page(title: str, body: str, lang: str = "en") -> str:
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="{"zh-CN" if lang == "zh" else "en"}"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def _shown(piece: str) -> str:
    """A piece as it appears in a label: newlines and tabs visible."""
    return piece.replace("\n", "⏎").replace("\t", "⇥") or "·"


def _span(piece: str, color: str, tip: str, i: int, value: float | None) -> str:
    v = "" if value is None else f' data-value="{value!r}"'
    if not piece:
        return f'<span class="tok empty" data-i="{i}"{v} title="{html.escape(tip)}"></span>'
    return (
        f'<span class="tok" data-i="{i}"{v} style="background:{color}" title="{html.escape(tip)}">'
        f"{html.escape(piece)}</span>"
    )


def _red(frac: float) -> str:
    frac = min(max(frac, 0.0), 1.0)
    return f"rgba(220,40,40,{0.08 + 0.8 * frac:.3f})"


def _diverging(v: float, scale: float) -> str:
    frac = min(abs(v) / scale, 1.0) if scale > 0 else 0.0
    return f"rgba(30,150,60,{0.85 * frac:.3f})" if v >= 0 else f"rgba(220,40,40,{0.85 * frac:.3f})"


def _overview_png(attn: Any) -> bytes:
    """All layers x heads as small heatmaps (no token labels: those are in the table)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_layer, n_head = attn.shape[:2]
    fig = Figure(figsize=(1.3 * n_head + 0.5, 1.3 * n_layer + 0.3))
    FigureCanvasAgg(fig)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = fig.add_subplot(n_layer, n_head, layer * n_head + head + 1)
            ax.imshow(attn[layer, head], cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"L{layer} H{head}", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    return buf.getvalue()


def render_lm(r: dict[str, Any], layer: int, head: int, lang: str = "en") -> str:
    attn = r["attentions"]
    n_layer, n_head = attn.shape[:2]
    if not (-n_layer <= layer < n_layer) or not (0 <= head < n_head):
        raise ConfigError(f"--layer {layer} --head {head}: the model has {n_layer} layers and {n_head} heads")
    layer = layer % n_layer
    s = [v for v in r["surprisal"] if v is not None]
    top = max(max(s), 1e-9)
    spans = []
    for i, (piece, v) in enumerate(zip(r["pieces"], r["surprisal"])):
        if v is None:
            spans.append(_span(piece, "#eee", f"token {i}: the first token (no prediction)", i, None))
        else:
            tip = f"token {i} {_shown(piece)!r}: surprisal {v:.3f} nats, p = {math.exp(-v):.4f}"
            spans.append(_span(piece, _red(v / top), tip, i, v))
    T = min(len(r["ids"]), MAX_HEATMAP_TOKENS)
    a = attn[layer, head][:T, :T]
    head_row = "".join(f'<th class="col">{html.escape(_shown(p))}</th>' for p in r["pieces"][:T])
    rows = []
    for q in range(T):
        cells = "".join(
            f'<td style="background:rgba(31,119,180,{a[q, k]:.3f})" title="{html.escape(_shown(r["pieces"][q]))} → '
            f'{html.escape(_shown(r["pieces"][k]))}: {a[q, k]:.3f}"></td>'
            for k in range(T)
        )
        rows.append(f"<tr><th>{html.escape(_shown(r['pieces'][q]))}</th>{cells}</tr>")
    overview = base64.b64encode(_overview_png(attn)).decode("ascii")
    ppl = math.exp(min(r["mean_surprisal"], 50))
    cut = _TEXTS[lang]["cut"].format(n=T) if T < len(r["ids"]) else ""
    t = _TEXTS[lang]
    worst = 1 + int(max(range(len(s)), key=lambda i: s[i]))
    body = (
        f"<h1>{t['lm_title']}</h1><p class='muted'>{html.escape(r['checkpoint'])}</p>"
        f"<h2>{t['surprisal']}</h2><p>{t['surprisal_help']}</p>"
        f'<table class="kv"><tr><th>{t["tokens"]}</th><td data-key="tokens">{len(r["ids"])}</td></tr>'
        f'<tr><th>{t["mean_surprisal"]}</th><td data-key="mean_surprisal" data-value="{r["mean_surprisal"]!r}">'
        f"{r['mean_surprisal']:.4f}</td></tr>"
        f'<tr><th>{t["perplexity"]}</th><td data-key="perplexity">{ppl:.3f}</td></tr>'
        f"<tr><th>{t['most_surprising']}</th><td>{html.escape(_shown(r['pieces'][worst]))} "
        f"({max(s):.3f} nats)</td></tr></table>"
        f'<div class="tokens" id="surprisal">{"".join(spans)}</div>'
        f"<h2>{t['attention'].format(layer=layer, head=head)}</h2>"
        f"<p>{t['attention_help']}{cut}</p>"
        f'<table class="attn" id="attention"><tr><th></th>{head_row}</tr>{"".join(rows)}</table>'
        f"<h2>{t['all_heads']}</h2><p>{t['all_heads_help']}</p>"
        f'<img alt="{t["all_heads"]}" src="data:image/png;base64,{overview}">'
    )
    if r.get("truncated"):
        body += f"<p class='muted'>{t['truncated']}</p>"
    return _page("owngpt explain", body, lang)


def render_classifier(r: dict[str, Any], lang: str = "en") -> str:
    scores = r["attributions"]
    scale = max((abs(v) for v in scores), default=0.0) or 1.0
    spans = []
    for i, (piece, v) in enumerate(zip(r["pieces"], scores)):
        tip = f"token {i} {_shown(piece)!r}: {v:+.4f} to p({r['target']})"
        spans.append(_span(piece, _diverging(v, scale), tip, i, v))
    probs = "".join(
        f'<tr><th>{html.escape(lab)}</th><td data-key="prob.{html.escape(lab)}" data-value="{p!r}">{p:.4f}</td></tr>'
        for lab, p in zip(r["labels"], r["probs"])
    )
    order = sorted(range(len(scores)), key=lambda i: -abs(scores[i]))[:8]
    top = "".join(f"<tr><td>{html.escape(_shown(r['pieces'][i]))}</td><td>{scores[i]:+.4f}</td></tr>" for i in order)
    total = sum(scores)
    t = _TEXTS[lang]
    target = html.escape(r["target"])
    diff = r["prob"] - r["baseline_prob"]
    body = (
        f"<h1>{t['cls_title']}</h1><p class='muted'>{html.escape(r['checkpoint'])}</p>"
        f'<p style="font-size:1.3em">{t["predicted"]}: <b id="label" data-value="{target}">{target}</b>, '
        f'{t["probability"]} <b id="prob" data-value="{r["prob"]!r}">{r["prob"]:.4f}</b></p>'
        f'<table class="kv">{probs}</table>'
        f"<h2>{t['why']}</h2><p>{t['why_help'].format(steps=r['n_steps'], target=target)}</p>"
        f'<p class="legend"><span style="background:rgba(30,150,60,.6)">{t["raises"]}</span>'
        f'<span style="background:rgba(220,40,40,.6)">{t["lowers"]}</span></p>'
        f'<div class="tokens" id="attribution">{"".join(spans)}</div>'
        f"<h2>{t['completeness']}</h2>"
        f'<table class="kv"><tr><th>{t["sum"]}</th><td data-key="sum" data-value="{total!r}">{total:+.4f}'
        f"</td></tr><tr><th>p({target} | {t['text']}) − p({target} | {t['baseline']})</th>"
        f'<td data-key="difference" data-value="{diff!r}">'
        f"{r['prob']:.4f} − {r['baseline_prob']:.4f} = {diff:+.4f}</td></tr>"
        f'<tr><th>{t["error"]}</th><td data-key="delta">{r["delta"]:+.2e}</td></tr></table>'
        f"<h2>{t['strongest']}</h2><table class='kv'>{top}</table>"
    )
    return _page("owngpt explain", body, lang)


def write_explanation(
    ckpt: str,
    text: str,
    out: str | os.PathLike,
    layer: int = -1,
    head: int = 0,
    n_steps: int = 64,
    target: str | None = None,
    overwrite: bool = False,
    lang: str = "en",
) -> tuple[Path, dict[str, Any]]:
    """Explain `text` with the checkpoint (a classifier or a language model, from its owngpt.json) into `out`."""

    if not text:
        raise ConfigError("--text is empty: give the text to explain")
    if lang not in _TEXTS:
        raise ConfigError(f"--lang {lang}: expected one of {', '.join(_TEXTS)}")
    path = Path(out)
    if path.suffix.lower() != ".html":
        raise ConfigError(f"--out {path}: give a file name ending in .html")
    if path.exists() and not overwrite:
        raise ConfigError(f"--out {path} exists: pass --overwrite or choose another name")
    c = open_checkpoint(ckpt)
    if c.task == "classify":
        r = explain_classifier(c, text, n_steps=n_steps, target=target)
        page = render_classifier(r, lang)
    else:
        r = explain_lm(c, text)
        page = render_lm(r, layer, head, lang)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, page)
    return path, r
