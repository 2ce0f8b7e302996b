// The OpenFeature Node server SDK with the OFREP provider, pointed at
// Flywheel with nothing changed but the base URL and the key header.
// Usage: node openfeature.mjs <base-url> <publishable-key>
// Prints one JSON array of evaluation details (see cli.rs for what is checked).
import { OpenFeature } from '@openfeature/server-sdk';
import { OFREPProvider } from '@openfeature/ofrep-provider';

const [baseUrl, key] = process.argv.slice(2);
await OpenFeature.setProviderAndWait(
  new OFREPProvider({ baseUrl, headers: { Authorization: `Bearer ${key}` } }),
);
const client = OpenFeature.getClient();
const pro = { targetingKey: 'of-user', plan: 'pro' };
const free = { targetingKey: 'of-user', plan: 'free' };
const details = [
  await client.getBooleanDetails('pro-feature', false, pro),
  await client.getBooleanDetails('pro-feature', true, free),
  await client.getStringDetails('banner', 'fallback', pro),
  await client.getBooleanDetails('missing-flag', true, pro),
  await client.getBooleanDetails('killed', true, pro),
  await client.getStringDetails('pro-feature', 'wrong type', pro),
];
console.log(JSON.stringify(details.map((d) => ({
  flagKey: d.flagKey, value: d.value, variant: d.variant ?? null, reason: d.reason, errorCode: d.errorCode ?? null,
}))));
await OpenFeature.close();
