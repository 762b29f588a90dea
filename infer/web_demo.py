"""The chat web UI: `streamlit run infer/web_demo.py -- --ckpt CKPT` (or `-- --api URL`).

With `--ckpt` the engine runs in the Streamlit process (one reply at a time across sessions: the
engine is not shared between threads); with `--api URL` it talks to a running `minimind serve`
through the openai client. Replies stream in; the model's `<think>` reasoning is shown in a
collapsible block above the answer; sampling controls live in the sidebar. Without script
arguments (e.g. under Streamlit's AppTest) the flags come from MINIMIND_WEB_CKPT / MINIMIND_WEB_API.
"""

import argparse
import os
import sys
import threading

import streamlit as st


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="web_demo.py")
    p.add_argument("--ckpt", default=os.environ.get("MINIMIND_WEB_CKPT"), metavar="CKPT")
    p.add_argument("--lora", default=None, metavar="DIR")
    p.add_argument("--api", default=os.environ.get("MINIMIND_WEB_API"), metavar="URL",
                   help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=os.environ.get("MINIMIND_WEB_API_KEY", "none"))
    p.add_argument("--device", default="cpu")
    args, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args


@st.cache_resource
def local_backend(ckpt: str, lora: str | None, device: str):
    from infer.engine import Engine

    return Engine.from_checkpoint(ckpt, lora=lora, device=device, max_batch=1), threading.Lock()


@st.cache_resource
def api_backend(url: str, key: str):
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=key, max_retries=0)
    return client, client.models.list().data[0].id


def stream_local(ckpt_args, messages: list[dict], sampling: dict):
    """(reasoning delta, content delta) pairs from the in-process engine."""
    from infer.sampling import SamplingParams
    from infer.think import ThinkSplitter

    engine, lock = local_backend(ckpt_args.ckpt, ckpt_args.lora, ckpt_args.device)
    ids = engine.encode_chat(messages)
    room = engine.max_len - len(ids)
    if room <= 0:
        raise ValueError(f"the conversation is longer than the context ({engine.max_len} tokens); clear it")
    params = SamplingParams(**{**sampling, "max_new_tokens": min(sampling["max_new_tokens"], room)})
    splitter = ThinkSplitter()
    with lock:
        for delta in engine.stream(ids, params):
            yield splitter.feed(delta.text, final=delta.finish_reason is not None)


def stream_api(args, messages: list[dict], sampling: dict):
    from openai import BadRequestError

    client, model = api_backend(args.api, args.api_key)

    def create(max_tokens):
        return client.chat.completions.create(
            model=model, messages=messages, stream=True, max_tokens=max_tokens,
            temperature=sampling["temperature"], top_p=sampling["top_p"], seed=sampling["seed"],
            extra_body={"top_k": sampling["top_k"]},
        )

    try:
        stream = create(sampling["max_new_tokens"])
    except BadRequestError as e:
        if (e.body or {}).get("code") != "context_length_exceeded":
            raise
        stream = create(None)  # the slider asked for more than fits: let the server use what is left
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            yield (delta.model_extra or {}).get("reasoning_content") or "", delta.content or ""


def sidebar() -> tuple[dict, str]:
    with st.sidebar:
        st.header("Sampling")
        sampling = dict(
            temperature=st.slider("temperature", 0.0, 2.0, 0.7, 0.05),
            top_p=st.slider("top_p", 0.05, 1.0, 0.9, 0.05),
            top_k=int(st.number_input("top_k (0: off)", min_value=0, max_value=1000, value=0)),
            max_new_tokens=int(st.slider("max new tokens", 16, 2048, 512, 16)),
        )
        seed = int(st.number_input("seed (-1: random)", min_value=-1, value=-1))
        sampling["seed"] = None if seed < 0 else seed
        system = st.text_area("system prompt", "")
        if st.button("Clear chat"):
            st.session_state.messages = []
    return sampling, system


def visible_reasoning(reasoning: str | None) -> str | None:
    """What goes in the "Thinking" box, None for no box: a model that does not reason (or emits an
    empty `<think>\n\n</think>`, as Qwen3 does with thinking off) gets no box at all."""
    return (reasoning or "").strip() or None


def show(message: dict) -> None:
    with st.chat_message(message["role"]):
        if thinking := visible_reasoning(message.get("reasoning")):
            with st.expander("Thinking", expanded=False):
                st.markdown(thinking)
        st.markdown(message["content"])


def reply(args, history: list[dict], sampling: dict, system: str) -> dict:
    """Stream the assistant's answer into the page; returns the finished message."""
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": m["role"], "content": m["content"]} for m in history]
    source = stream_api(args, messages, sampling) if args.api else stream_local(args, messages, sampling)
    reasoning, content = "", ""
    with st.chat_message("assistant"):
        think_slot, answer = st.empty(), st.empty()  # the box appears above the answer, once there is reasoning
        think_text = None
        for r, c in source:
            reasoning, content = reasoning + r, content + c
            if r and (thinking := visible_reasoning(reasoning)):
                if think_text is None:
                    think_text = think_slot.expander("Thinking", expanded=True).empty()
                think_text.markdown(thinking)
            if c:
                answer.markdown(content + " ▌")
        answer.markdown(content)
    return {"role": "assistant", "content": content, "reasoning": reasoning}


def main() -> None:
    args = parse_args()
    st.set_page_config(page_title="minimind chat")
    st.title("minimind chat")
    if not args.ckpt and not args.api:
        st.error("start with `streamlit run infer/web_demo.py -- --ckpt CKPT` or `-- --api URL`")
        return
    st.caption(f"model: {args.api or args.ckpt}")
    sampling, system = sidebar()
    history = st.session_state.setdefault("messages", [])
    for message in history:
        show(message)
    text = st.chat_input("Say something")
    if text:
        history.append({"role": "user", "content": text})
        show(history[-1])
        try:
            history.append(reply(args, history, sampling, system))
        except Exception as e:  # a dead server or a full context: tell the user, keep the page alive
            history.pop()
            st.error(f"no reply: {e}")


if __name__ == "__main__":  # `streamlit run` (and AppTest) run the file as __main__
    main()
