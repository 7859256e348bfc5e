// Java's java.net.http.HttpClient as docs/operations.md shows it: the JVM-wide proxy
// properties (-Dhttp.proxyHost, -Dhttps.proxyHost, ...) through ProxySelector.getDefault(),
// and the trust store from -Djavax.net.ssl.trustStore. Prints the status, then the body.
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Recipe {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newBuilder().proxy(ProxySelector.getDefault()).build();
        HttpResponse<String> response = client.send(
                HttpRequest.newBuilder(URI.create(args[0])).build(),
                HttpResponse.BodyHandlers.ofString());
        System.out.println(response.statusCode());
        System.out.println(response.body());
    }
}
