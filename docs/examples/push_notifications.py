"""A push-notification service on the event streams (docs/events.md): it tells a partner of
each gesture sent while they had no WebSocket open. Run: REDIS_URL=… JWT_SECRET=…
EVENTS_API_URL=http://service:8000 python docs/examples/push_notifications.py"""

import asyncio
import json
import os
from collections import OrderedDict

from service.auth import issue
from service.consumer import Consumer, Delivery
from service.schemas import GestureSent

seen: OrderedDict[str, None] = OrderedDict()  # at least once: dedupe by event_id


async def notify(relationship_id: str, partner: str, gesture_type: str) -> None:
    """Stands in for APNs or FCM: one JSON line a notification."""
    line = {"push": partner, "relationship_id": relationship_id, "what": gesture_type}
    print(json.dumps(line), flush=True)


async def handle(delivery: Delivery) -> None:
    event = delivery.event()
    if not isinstance(event, GestureSent) or event.recipient_online is not False:
        return
    if delivery.event_id in seen:
        return
    partner = "partner_b" if event.gesture.sent_by == "partner_a" else "partner_a"
    await notify(str(event.relationship_id), partner, event.gesture.gesture_type)
    seen[delivery.event_id] = None
    if len(seen) > 100_000:
        seen.popitem(last=False)


async def main() -> None:
    env = os.environ
    token = lambda: issue(env["JWT_SECRET"], service=True, ttl=300)  # noqa: E731
    async with Consumer(
        env["REDIS_URL"],
        group="push",
        prefix=env.get("CHANNEL_PREFIX", "gestures:"),
        api_url=env["EVENTS_API_URL"],
        api_token=token,
    ) as consumer:
        await consumer.run(handle)


if __name__ == "__main__":
    asyncio.run(main())
