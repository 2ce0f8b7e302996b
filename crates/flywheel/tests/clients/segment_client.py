"""Sends every Segment call through the official Python library, unchanged
but for `host`, to a Flywheel server. Usage: segment_client.py BASE_URL WRITE_KEY"""
import sys

import segment.analytics as analytics

base_url, write_key = sys.argv[1], sys.argv[2]
errors = []
analytics.write_key = write_key
analytics.host = base_url
analytics.on_error = lambda error, batch: errors.append(repr(error))
analytics.sync_mode = True

analytics.track("seg-user", "Segment Signed Up", {"plan": "free"}, anonymous_id="seg-anon")
analytics.identify("seg-user", {"name": "Ada"}, anonymous_id="seg-anon")
analytics.alias("seg-old", "seg-user")
analytics.group("seg-user", "seg-org", {"name": "Acme"})
analytics.page("seg-user", "Docs", "Pricing")
analytics.screen("seg-user", "App", "Home")
analytics.flush()

if errors:
    print("errors:", errors, file=sys.stderr)
    sys.exit(1)
print("segment: sent 6 calls")
