// Submits a small, endless streaming job to a running Flink session cluster, using only
// Table API SQL and connectors that ship with Flink (no user code, no extra jars):
//
//   datagen (rows-per-second, parallelism 2) -> filter + projection -> blackhole
//
// Usage (start-cluster.sh does this):
//   javac -cp '<flink>/lib/*' -d <classes> SqlJob.java
//   java -cp '<classes>:<flink>/lib/*' SqlJob <rest-host> <rest-port> [rows-per-second] [job-name]
//
// It prints the job id on stdout as `JOB_ID=<32 hex>` and exits once the job is submitted;
// the job keeps running on the cluster until cancelled.

import java.util.HashMap;
import java.util.Map;

import org.apache.flink.configuration.Configuration;
import org.apache.flink.table.api.EnvironmentSettings;
import org.apache.flink.table.api.TableEnvironment;
import org.apache.flink.table.api.TableResult;

public final class SqlJob {
    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: SqlJob <rest-host> <rest-port> [rows-per-second] [job-name]");
            System.exit(2);
        }
        String host = args[0];
        String port = args[1];
        String rowsPerSecond = args.length > 2 ? args[2] : "2000";
        String jobName = args.length > 3 ? args[3] : "picket-datagen-blackhole";

        Map<String, String> options = new HashMap<>();
        // "remote" makes the client build the job graph here and POST it to the cluster's REST
        // endpoint, like `flink run -m host:port` would.
        options.put("execution.target", "remote");
        options.put("rest.address", host);
        options.put("rest.port", port);
        options.put("parallelism.default", "2");
        options.put("pipeline.name", jobName);
        // Without this the planner chains source, calc and sink into one task, so the job has a
        // single vertex. Three vertices give per-vertex metrics and back-pressure something to
        // tell apart (and forward edges between them carry network buffers).
        options.put("pipeline.operator-chaining.enabled", "false");
        // Also set cluster-wide in config.yaml; repeated so the job checkpoints even on a
        // cluster started without it.
        options.put("execution.checkpointing.interval", "2s");

        EnvironmentSettings settings =
                EnvironmentSettings.newInstance()
                        .inStreamingMode()
                        .withConfiguration(Configuration.fromMap(options))
                        .build();
        TableEnvironment tEnv = TableEnvironment.create(settings);

        // Only random fields: a `sequence` field would make the source finite. Both connectors
        // ship in Flink's lib/ (flink-table-api-java-uber), on the client and the cluster.
        tEnv.executeSql(
                "CREATE TABLE events ("
                        + "  user_id INT,"
                        + "  amount DOUBLE,"
                        + "  category STRING,"
                        + "  ts AS LOCALTIMESTAMP"
                        + ") WITH ("
                        + "  'connector' = 'datagen',"
                        + "  'rows-per-second' = '" + rowsPerSecond + "',"
                        + "  'fields.user_id.min' = '1',"
                        + "  'fields.user_id.max' = '10000',"
                        + "  'fields.amount.min' = '0',"
                        + "  'fields.amount.max' = '1000',"
                        + "  'fields.category.length' = '4'"
                        + ")");
        tEnv.executeSql(
                "CREATE TABLE sink ("
                        + "  user_id INT,"
                        + "  amount_cents BIGINT,"
                        + "  category STRING,"
                        + "  ts TIMESTAMP(3)"
                        + ") WITH ('connector' = 'blackhole')");

        // Roughly half the rows pass the filter, so numRecordsIn/Out differ between vertices.
        TableResult result =
                tEnv.executeSql(
                        "INSERT INTO sink "
                                + "SELECT user_id, CAST(amount * 100 AS BIGINT), UPPER(category), ts "
                                + "FROM events WHERE amount >= 500");

        // Do not await the result: the INSERT never finishes. Submission is complete once the
        // job client exists.
        String jobId =
                result.getJobClient()
                        .orElseThrow(() -> new IllegalStateException("no job client"))
                        .getJobID()
                        .toString();
        System.out.println("JOB_ID=" + jobId);
        System.exit(0);
    }
}
