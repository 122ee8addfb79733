"""Sends Segment calls with the real segment-analytics-python to the collector at argv[1]
with write key argv[2]; exits non-zero when a request fails."""

import sys

from segment import analytics

failed = []


def on_error(error, batch):
    print("segment error:", error, file=sys.stderr)
    failed.append(error)


analytics.host = sys.argv[1]
analytics.write_key = sys.argv[2]
analytics.on_error = on_error
analytics.max_retries = 0

user = "py-bo"
runner = {"product_id": "sku-2", "category": "hats", "name": "Cap", "price": 5.5}
analytics.identify(user_id=user, anonymous_id="py-v1", traits={"email": "bo@example.com", "plan": "free"})
analytics.page(user_id=user, name="Home", properties={"url": "https://shop.example/"})
analytics.track(user_id=user, event="Product Viewed", properties=runner)
analytics.track(user_id=user, event="Product Added", properties=dict(runner, quantity=3))
analytics.track(
    user_id=user,
    event="Order Completed",
    properties={"order_id": "py-o1", "total": 16.5, "currency": "USD", "products": [dict(runner, quantity=3)]},
)
analytics.page(anonymous_id="py-v2", name="Landing")
analytics.alias(previous_id="py-v2", user_id=user)
# Marketing granted through the source's category mapping ("Advertising").
analytics.track(
    user_id=user,
    event="Newsletter Signup",
    context={"consent": {"categoryPreferences": {"analytics": True, "Advertising": True}}},
)
analytics.group(user_id=user, group_id="initech", traits={"name": "Initech"})
analytics.flush()
analytics.shutdown()
sys.exit(1 if failed else 0)
