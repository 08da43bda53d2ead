"""Python reference for `datagen bench client`: the `openai` package's AsyncOpenAI with an
asyncio semaphore, making the same chat completions against the same loopback server.
Prints one JSON line: {"requests_per_s": ..., "cpu_ms_per_request": ...} (CPU = this
process's user + system time).

    datagen bench client --reference ".venv/bin/python datagen/benches/reference_client.py"
"""

import argparse
import asyncio
import json
import resource
import time

from openai import AsyncOpenAI


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one(client, semaphore, stream):
    async with semaphore:
        if stream:
            response = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": "What is 1+1?"}],
                temperature=0.6, top_p=0.95, max_tokens=64, stream=True, stream_options={"include_usage": True})
            text = []
            async for chunk in response:
                if chunk.choices:
                    delta = chunk.choices[0].delta
                    text.append(getattr(delta, "content", None) or "")
                    text.append(getattr(delta, "reasoning_content", None) or "")
            return "".join(text)
        response = await client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": "What is 1+1?"}],
            temperature=0.6, top_p=0.95, max_tokens=64)
        return response.choices[0].message.content


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--no-stream", action="store_true")
    args = parser.parse_args()
    client = AsyncOpenAI(base_url=args.url, api_key="unused", max_retries=0, timeout=60)
    semaphore = asyncio.Semaphore(args.concurrency)
    cpu, start = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(one(client, semaphore, not args.no_stream) for _ in range(args.requests)))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    print(json.dumps({"requests_per_s": args.requests / seconds, "cpu_ms_per_request": 1000 * cpu / args.requests}))


if __name__ == "__main__":
    asyncio.run(main())
