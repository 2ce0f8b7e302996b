"""Captures events through the official PostHog Python library, unchanged but
for `host`, to a Flywheel server. Usage: posthog_client.py BASE_URL API_KEY"""
import sys

from posthog import Posthog

base_url, api_key = sys.argv[1], sys.argv[2]
errors = []
client = Posthog(
    api_key,
    host=base_url,
    sync_mode=True,
    # No feature-flag polling: Flywheel answers flags over OFREP instead.
    personal_api_key=None,
    disable_geoip=True,
    on_error=lambda error, batch: errors.append(repr(error)),
)
client.capture("ph anonymous view", distinct_id="ph-anon", properties={"page": "/pricing"})
client.capture("$identify", distinct_id="ph-user", properties={"$anon_distinct_id": "ph-anon"})
client.capture("ph project created", distinct_id="ph-user", properties={"n": 3}, groups={"company": "ph-org"})
client.flush()
client.shutdown()

if errors:
    print("errors:", errors, file=sys.stderr)
    sys.exit(1)
print("posthog: sent 3 events")
