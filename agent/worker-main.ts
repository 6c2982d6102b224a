/** The entry point of an agent worker process, forked by the primary (agent/pool.ts). */
import { runWorker } from "./worker.ts";

runWorker();
