// Upload.java: java.net.http.HttpClient sending METHOD URL BODY (POST or PUT) through the
// JVM-wide proxy properties (-Dhttp.proxyHost/-Dhttp.proxyPort) or to a base URL. Over plain
// HTTP the client offers `Upgrade: h2c` with every request, body included.
// Run it as `java [properties] Upload.java METHOD URL BODY`; it prints the status, then the body.
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Upload {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newBuilder().proxy(ProxySelector.getDefault()).build();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[1]))
                .method(args[0], HttpRequest.BodyPublishers.ofString(args[2]))
                .header("Content-Type", "text/plain")
                .build();
        HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
        System.out.println(response.statusCode());
        System.out.println(response.body());
    }
}
