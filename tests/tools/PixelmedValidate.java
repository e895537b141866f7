// Runs pixelmed's DicomSRValidator for a whole test session in one JVM (it starts slowly: about
// 10 s to compile its XSLT). Reads batches of file paths from stdin, one per line, each batch
// ended by an empty line; for each batch prints "### FILE" and that file's report for every
// file in the order given, then "### END". Files of a batch are validated in parallel, one
// validator per thread. Usage: java -cp pixelmed.jar PixelmedValidate.java < paths
import com.pixelmed.validate.DicomSRValidator;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

public class PixelmedValidate {
    private static final ThreadLocal<DicomSRValidator> VALIDATOR = ThreadLocal.withInitial(() -> {
        try {
            return new DicomSRValidator();
        } catch (Exception e) {
            throw new RuntimeException(e);
        }
    });

    private static String report(String path) {
        try {
            // describe, do not match case of code meanings, ambiguous templates, item order, template ID
            return VALIDATOR.get().validate(path, false, false, false, true, true);
        } catch (Exception e) {
            return "Error: validator failed: " + e + "\n";
        }
    }

    public static void main(String[] args) throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(Runtime.getRuntime().availableProcessors());
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        List<String> batch = new ArrayList<>();
        for (String line = in.readLine(); line != null; line = in.readLine()) {
            if (!line.isEmpty()) {
                batch.add(line);
                continue;
            }
            List<Future<String>> reports = new ArrayList<>();
            for (String path : batch) {
                reports.add(pool.submit(() -> report(path)));
            }
            for (int i = 0; i < batch.size(); i++) {
                System.out.println("### " + batch.get(i));
                System.out.print(reports.get(i).get());
            }
            System.out.println("### END");
            System.out.flush();
            batch.clear();
        }
        pool.shutdown();
    }
}
