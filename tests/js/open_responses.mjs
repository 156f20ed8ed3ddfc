// The Vercel AI SDK's Open Responses provider against a live hmt-serve: generate, stream, and a
// continuation (the SDK replays the conversation as input items). Prints one JSON line of results;
// tests/service/test_serve_js_client.py checks them.
import { createOpenResponses } from '@ai-sdk/open-responses';
import { generateText, streamText } from 'ai';

const [url, modelId] = process.argv.slice(2);
const provider = createOpenResponses({ name: 'hmt', url: `${url}/v1/responses` });
const model = provider(modelId);
const settings = { model, maxOutputTokens: 6, temperature: 0 };

const generated = await generateText({ ...settings, prompt: 'hello world' });
const streamed = streamText({ ...settings, prompt: 'hello world' });
let deltas = 0;
for await (const delta of streamed.textStream) {
  deltas += delta.length > 0 ? 1 : 0;
}
const continued = await generateText({
  ...settings,
  messages: [
    { role: 'user', content: 'hello world' },
    { role: 'assistant', content: generated.text },
    { role: 'user', content: 'the lazy dog' },
  ],
});
console.log(JSON.stringify({
  generated: generated.text,
  generatedUsage: generated.usage,
  finishReason: generated.finishReason,
  streamed: await streamed.text,
  deltas,
  continued: continued.text,
  continuedUsage: continued.usage,
}));
