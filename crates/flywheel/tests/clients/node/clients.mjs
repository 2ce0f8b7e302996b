// Sends events through the official Node libraries, unchanged but for the
// host, to a Flywheel server. Usage: node clients.mjs BASE_URL WRITE_KEY
import { Analytics } from '@segment/analytics-node';
import { PostHog } from 'posthog-node';

const [baseUrl, key] = process.argv.slice(2);
const errors = [];

const analytics = new Analytics({ writeKey: key, host: baseUrl, flushAt: 1, maxRetries: 0 });
analytics.on('error', (err) => errors.push(String(err?.reason ?? err)));
analytics.track({ userId: 'node-seg-user', anonymousId: 'node-seg-anon', event: 'Node Signed Up', properties: { plan: 'free' } });
analytics.identify({ userId: 'node-seg-user', traits: { name: 'Grace' } });
analytics.group({ userId: 'node-seg-user', groupId: 'node-org' });
await analytics.closeAndFlush({ timeout: 10000 });

const posthog = new PostHog(key, { host: baseUrl, flushAt: 1, flushInterval: 0 });
posthog.on('error', (err) => errors.push(String(err)));
posthog.capture({ distinctId: 'node-ph-user', event: 'node project created', properties: { n: 1 } });
posthog.alias({ distinctId: 'node-ph-user', alias: 'node-ph-old' });
await posthog.shutdown(10000);

if (errors.length) {
  console.error('errors:', errors);
  process.exit(1);
}
console.log('node: sent 5 calls');
