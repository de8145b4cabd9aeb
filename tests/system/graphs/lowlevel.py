"""A graph whose entry service reaches the Worker through the seed's low-level path:

runtime = servegrid_context["runtime"]
ns, name = Worker.address()
client = await runtime.namespace(ns).component(name).endpoint("generate").client()
"""

from __future__ import annotations

from servegrid.components.worker import Worker
from servegrid.engines.base import EngineOutput, EngineRequest, SamplingParams
from servegrid.sdk import depends, endpoint, service
from servegrid.sdk.context import servegrid_context


@service()
class Caller:
    worker = depends(Worker)

    @endpoint()
    async def echo(self, token_ids: list[int]) -> dict:
        runtime = servegrid_context["runtime"]
        ns, name = Worker.address()
        client = await runtime.namespace(ns).component(name).endpoint("generate").client()
        await client.wait_for_instances(1, timeout=30)
        request = EngineRequest("lowlevel", token_ids, SamplingParams(max_tokens=len(token_ids)))
        produced: list[int] = []
        async for output in await client.round_robin(request, EngineOutput):
            produced.extend(output.token_ids)
        return {"namespace": ns, "component": name, "tokens": produced}


Caller.link(Worker)
