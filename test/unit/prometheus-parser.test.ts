/** The test-bed's strict Prometheus text-format parser (testbed/prometheus.ts): what it accepts and what it refuses. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { parsePrometheusText, sampleSum } from "../../testbed/prometheus.ts";

const GOOD = `# HELP x_requests_total Requests.
# TYPE x_requests_total counter
x_requests_total{op="Encrypt",store="/a \\"b\\"\\\\c"} 3
x_requests_total{op="Decrypt",store="(none)"} 1.5e0
# a free comment
# TYPE x_up gauge
x_up NaN
# TYPE x_seconds histogram
x_seconds_bucket{op="E",le="0.1"} 1
x_seconds_bucket{op="E",le="+Inf"} 2
x_seconds_sum{op="E"} 0.3
x_seconds_count{op="E"} 2
`;

test("a valid exposition: families, types, help, escaped label values", () => {
  const f = parsePrometheusText(GOOD);
  assert.equal(f.get("x_requests_total")?.type, "counter");
  assert.equal(f.get("x_requests_total")?.help, "Requests.");
  assert.equal(sampleSum(f, "x_requests_total"), 4.5);
  assert.equal(f.get("x_requests_total")?.samples[0].labels.store, '/a "b"\\c');
  assert.ok(Number.isNaN(f.get("x_up")?.samples[0].value));
  assert.equal(sampleSum(f, "x_seconds_count", { op: "E" }), 2);
});

test("every kind of malformed exposition is refused with the line", () => {
  const bad: [string, RegExp][] = [
    ["x_total 1", /newline/],
    ["9x 1\n", /bad metric name/],
    ['x{a="1} 1\n', /unterminated/],
    ["x{a=1} 1\n", /not quoted/],
    ['x{a="\\t"} 1\n', /bad escape/],
    ['x{1a="v"} 1\n', /bad label name/],
    ['x{a="v",a="w"} 1\n', /twice/],
    ["x one\n", /bad sample value/],
    ["x 1 2 3\n", /bad value or timestamp/],
    ["x 1\nx 2\n", /twice/],
    ["# TYPE x counter\nx 1\n", /_total/],
    ["# TYPE x_total counter\n# TYPE x_total gauge\nx_total 1\n", /twice/],
    ["# HELP x a\n# HELP x b\nx 1\n", /second HELP/],
    ["# TYPE x wobble\n", /bad type/],
    ['a 1\nb 1\na{l="2"} 1\n', /continues after another family/],
    ['# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n', /not cumulative/],
    ['# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n', /\+Inf/],
    ['# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 1\n', /differs/],
    ['# TYPE h histogram\nh_bucket{le="+Inf"} 1\nh_count 1\n', /no _sum/],
    ['x_total{a="1"}1\n', /space/],
  ];
  for (const [text, why] of bad) assert.throws(() => parsePrometheusText(text), why, JSON.stringify(text));
});
