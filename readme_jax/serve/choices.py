"""A generation request's answer from its engine streams (one per choice: prompt x sample): the collected body
of a non-streamed request, or the SSE events of a streamed one, with logprobs, echo and vLLM's prompt_logprobs
(non-streamed only).

    body = await complete(request, req, streams, request_id, done, tokenizer)     # dict or an error Response
    return StreamingResponse(events(req, streams, request_id, created, done, tokenizer), ...)

Echo: the choice's text starts with its prompt's decoding and, with logprobs, its logprobs start with the
prompt's (the first token's None, as OpenAI and vLLM send it); streamed, the prompt comes in the choice's first
chunk. Logprob entries follow the engine's token ids (a stop token included), formatted by
``responses.Logprobs``.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from readme_jax.errors import APIError
from readme_jax.serve import responses


def cancel(streams) -> None:
    for s in streams:
        if not s.finished:
            s.cancel()


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merged(streams):
    """(choice index, output) of every stream as they arrive, until each has finished."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, out = await queue.get()
            if out is None:
                live -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()


def _usage(req, streams, finals) -> dict[str, int]:
    prompt = sum(finals[i].prompt_tokens or streams[i].prompt_tokens for i in range(0, len(streams), req.n))
    return responses.usage(prompt, sum(f.completion_tokens for f in finals.values()))


def _prompt_entries(prompt: list[int], prompt_logprobs) -> list:
    return list(zip(prompt, prompt_logprobs or [None] * len(prompt)))


def _body(req, request_id, created, texts, ids, lps, prompt_lps, finals, streams, tokenizer) -> dict:
    """The non-streamed body (run on a worker thread: echo and logprobs decode many tokens)."""
    fmt = responses.Logprobs(tokenizer, req.logprobs, req.tokens_as_ids) if req.logprobs is not None else None
    choices = []
    for i in range(len(streams)):
        prompt, text, entries = req.prompts[i // req.n], texts[i], []
        if req.echo:
            text = tokenizer.decode(prompt) + text
            entries = _prompt_entries(prompt, prompt_lps[i])
        text = req.echo_text + text
        logprobs = fmt.format(req.kind, entries + list(zip(ids[i], lps[i]))) if fmt is not None else None
        choices.append((i, text, finals[i].finish_reason, logprobs))
    body = responses.response(req.kind, request_id, created, req.model, choices, _usage(req, streams, finals))
    if req.prompt_logprobs is not None:               # vLLM's field: per choice (completions), once (chat)
        pfmt = responses.Logprobs(tokenizer, req.prompt_logprobs, req.tokens_as_ids)
        lists = [pfmt.prompt(_prompt_entries(req.prompts[i // req.n], prompt_lps[i])) for i in range(len(streams))]
        if req.kind == "chat":
            body["prompt_logprobs"] = lists[0]
        else:
            for c in body["choices"]:
                c["prompt_logprobs"] = lists[c["index"]]
    return body


async def complete(request: Request, req, streams, request_id: str, created: int, done, tokenizer):
    """Collect a non-streamed request; a client that disconnects first cancels it."""
    async def collect():
        k = len(streams)
        pieces, ids, lps, prompt_lps, finals = [[] for _ in range(k)], [[] for _ in range(k)], \
            [[] for _ in range(k)], [None] * k, {}
        async for i, out in merged(streams):
            pieces[i].append(out.text)
            ids[i] += out.token_ids
            lps[i] += out.logprobs or [None] * len(out.token_ids)
            if out.prompt_logprobs is not None:
                prompt_lps[i] = out.prompt_logprobs
            if out.finished:
                finals[i] = out
                done()
        return ["".join(p) for p in pieces], ids, lps, prompt_lps, finals

    task = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():                                  # the client went away
            return Response(status_code=499)
        texts, ids, lps, prompt_lps, finals = task.result()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        cancel(streams)
    for i in range(len(streams)):
        error = responses.final_error(finals[i])
        if error is not None:
            return error_response(error)
    return await asyncio.to_thread(_body, req, request_id, created, texts, ids, lps, prompt_lps, finals, streams,
                                   tokenizer)


async def events(req, streams, request_id: str, created: int, done, tokenizer):
    """The SSE body: the role chunk of each choice (chat: sent with that choice's first engine output, just before its
    first token's text, so a client's time to first chunk is its time to first token), the echoed prompt
    (completions) or last assistant message (chat), text chunks (with their tokens' logprobs when asked),
    finish_reason on each choice's last one, the usage chunk when asked, then ``[DONE]``. An engine failure or
    shutdown abort mid-stream is sent as an error event and ends the stream."""
    def chunk(**kw):
        return responses.sse(responses.chunk(req.kind, request_id, created, req.model,
                                             include_usage=req.include_usage, **kw))

    fmt = responses.Logprobs(tokenizer, req.logprobs, req.tokens_as_ids) if req.logprobs is not None else None
    first = set(range(len(streams)))
    offsets = [0] * len(streams)

    def logprobs(i, entries, text):
        if fmt is None:
            return None
        out = fmt.format(req.kind, entries, offsets[i])
        offsets[i] += len(text)
        return out

    finals = {}
    async for i, out in merged(streams):
        if i in first:
            first.discard(i)
            if req.kind == "chat":
                yield chunk(index=i, role=True)
                if req.echo_text:
                    yield chunk(index=i, text=req.echo_text)
            elif req.echo:
                prompt = req.prompts[i // req.n]
                text = tokenizer.decode(prompt)
                yield chunk(index=i, text=text, logprobs=logprobs(i, _prompt_entries(prompt, out.prompt_logprobs),
                                                                   text))
        entries = list(zip(out.token_ids, out.logprobs or []))
        if not out.finished:
            if out.text or entries and fmt is not None:
                yield chunk(index=i, text=out.text, logprobs=logprobs(i, entries, out.text))
            continue
        finals[i] = out
        done()
        error = responses.final_error(out)
        if error is not None:
            if out.text:
                yield chunk(index=i, text=out.text)
            yield responses.sse(error.body())
            break
        yield chunk(index=i, text=out.text, finish_reason=out.finish_reason,
                    logprobs=logprobs(i, entries, out.text))
    if req.include_usage and len(finals) == len(streams) and all(responses.final_error(f) is None
                                                                 for f in finals.values()):
        use = _usage(req, streams, finals)
        yield responses.sse(responses.chunk(req.kind, request_id, created, req.model, use=use))
    yield responses.sse("[DONE]")
