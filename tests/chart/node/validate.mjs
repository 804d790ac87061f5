// Reads a JSON list of Kubernetes objects on stdin and validates each ServiceMonitor and
// PrometheusRule against the prometheus-operator schemas. Prints one line per problem and
// exits 1 when there is any.
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = { ServiceMonitor, PrometheusRule };
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const objects = JSON.parse(Buffer.concat(chunks).toString("utf8"));
let problems = 0;
let checked = 0;
for (const obj of objects) {
  const Model = models[obj.kind];
  if (!Model) continue;
  checked += 1;
  try {
    new Model(obj).validate();
  } catch (err) {
    problems += 1;
    console.log(`${obj.kind}/${obj.metadata.name}: ${err.message}`);
  }
}
console.log(`checked ${checked}`);
process.exit(problems ? 1 : 0);
