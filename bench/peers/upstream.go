// Fake OpenAI-compatible upstream for the benchmark: fast enough never to be the bottleneck.
//
//	upstream -addr 127.0.0.1:0 [-parent-pid N] [-max-life 1800s]
//	         [-tls-cert cert.pem -tls-key key.pem [-plain-addr 127.0.0.1:0]] [-idle-timeout 0]
//
// With -tls-cert/-tls-key it serves HTTPS, HTTP/1.1 only (no h2 in ALPN: the proxies speak
// HTTP/1.1 upstream), and with -plain-addr the same handler over plain HTTP on a second port
// (printed as "plain <port>"). -idle-timeout closes keep-alive connections idle that long (0 = never).
// Prints "ready <port>" once listening. Any POST path (e.g. /v1/chat/completions):
//   - a JSON body with "stream": true gets Server-Sent Events: X-Bench-Events events (default 5),
//     X-Bench-Interval-Ms apart (default 50; event i is due at start + i*interval, the first at
//     once), each one HTTP chunk flushed at once and carrying "t_sent" (unix seconds, float: the
//     time it was written), then "data: [DONE]";
//   - anything else gets a ~600 B chat.completion JSON answer (Content-Length);
//   - a request with "X-Bench-Close: 1" is answered with "Connection: close" (the connection is
//     closed after it: every such request through a proxy costs it a new upstream connection).
//
// GET /_bench/health answers "ok"; GET /_bench/stats answers {"conns":N,"requests":M}: connections
// accepted (TLS: handshakes begun) and requests served since start. Standard library only.
package main

import (
	"bytes"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

var conns, requests atomic.Int64

var streamRe = regexp.MustCompile(`"stream"\s*:\s*true`)

// A stream that asks for usage ends with OpenAI's usage-only chunk (STREAM_USAGE=request's case).
var includeUsageRe = regexp.MustCompile(`"include_usage"\s*:\s*true`)

const usageChunk = `data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1732770000,` +
	`"model":"bench-model","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":70,"total_tokens":81}}` +
	"\n\n"

var jsonAnswer = func() []byte {
	content := strings.Repeat("The quick brown fox jumps over the lazy dog. ", 7)
	body := fmt.Sprintf(`{"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion",`+
		`"created":1732770000,"model":"bench-model","system_fingerprint":"fp_bench",`+
		`"choices":[{"index":0,"message":{"role":"assistant","content":%q},"logprobs":null,`+
		`"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":70,"total_tokens":81}}`,
		content)
	return []byte(body)
}()

func headerInt(r *http.Request, name string, def int) int {
	if v, err := strconv.Atoi(r.Header.Get(name)); err == nil && v >= 0 {
		return v
	}
	return def
}

func now() string {
	return strconv.FormatFloat(float64(time.Now().UnixNano())/1e9, 'f', 6, 64)
}

func serveSSE(w http.ResponseWriter, r *http.Request, usage bool) {
	events := headerInt(r, "X-Bench-Events", 5)
	interval := time.Duration(headerInt(r, "X-Bench-Interval-Ms", 50)) * time.Millisecond
	flusher, _ := w.(http.Flusher)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	start := time.Now()
	var buf bytes.Buffer
	timer := time.NewTimer(0)
	defer timer.Stop()
	<-timer.C
	for i := 0; i < events; i++ {
		if wait := time.Until(start.Add(time.Duration(i) * interval)); wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-r.Context().Done():
				return
			}
		}
		buf.Reset()
		buf.WriteString(`data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1732770000,`)
		buf.WriteString(`"model":"bench-model","seq":`)
		buf.WriteString(strconv.Itoa(i))
		buf.WriteString(`,"t_sent":`)
		buf.WriteString(now())
		buf.WriteString(`,"choices":[{"index":0,"delta":{"content":"token "},"finish_reason":null}]}` + "\n\n")
		if _, err := w.Write(buf.Bytes()); err != nil {
			return
		}
		if flusher != nil {
			flusher.Flush()
		}
	}
	if usage {
		io.WriteString(w, usageChunk)
	}
	io.WriteString(w, "data: [DONE]\n\n")
}

func handler(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/_bench/health":
		io.WriteString(w, "ok")
		return
	case "/_bench/stats":
		fmt.Fprintf(w, `{"conns":%d,"requests":%d}`, conns.Load(), requests.Load())
		return
	}
	requests.Add(1)
	if r.Header.Get("X-Bench-Close") == "1" {
		w.Header().Set("Connection", "close")
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	if streamRe.Match(body) {
		serveSSE(w, r, includeUsageRe.Match(body))
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(jsonAnswer)))
	w.Write(jsonAnswer)
}

// watchParent exits when the process that started us is gone, and after maxLife in any case,
// so a killed benchmark never leaves a server behind.
func watchParent(parent int, maxLife time.Duration) {
	deadline := time.Now().Add(maxLife)
	for range time.Tick(500 * time.Millisecond) {
		if (parent > 0 && os.Getppid() != parent) || time.Now().After(deadline) {
			os.Exit(0)
		}
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	parent := flag.Int("parent-pid", 0, "exit when this parent process is gone")
	maxLife := flag.Duration("max-life", 30*time.Minute, "exit after this long in any case")
	certFile := flag.String("tls-cert", "", "serve HTTPS with this PEM certificate (chain)")
	keyFile := flag.String("tls-key", "", "the certificate's PEM private key")
	idle := flag.Duration("idle-timeout", 0, "close keep-alive connections idle this long (0 = never)")
	plainAddr := flag.String("plain-addr", "", "with -tls-cert: also serve plain HTTP here")
	flag.Parse()
	go watchParent(*parent, *maxLife)
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "upstream:", err)
		os.Exit(1)
	}
	fmt.Printf("ready %d\n", ln.Addr().(*net.TCPAddr).Port)
	srv := &http.Server{
		Handler:           http.HandlerFunc(handler),
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       *idle,
		ConnState: func(c net.Conn, state http.ConnState) {
			if state == http.StateNew {
				conns.Add(1)
			}
		},
	}
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "upstream:", err)
			os.Exit(1)
		}
		// HTTP/1.1 only: no "h2" offered, and an empty TLSNextProto disables Go's automatic h2.
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}}
		srv.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
		if *plainAddr != "" {
			plainLn, err := net.Listen("tcp", *plainAddr)
			if err != nil {
				fmt.Fprintln(os.Stderr, "upstream:", err)
				os.Exit(1)
			}
			fmt.Printf("plain %d\n", plainLn.Addr().(*net.TCPAddr).Port)
			plain := &http.Server{Handler: srv.Handler, ReadHeaderTimeout: srv.ReadHeaderTimeout, IdleTimeout: *idle}
			go func() {
				fmt.Fprintln(os.Stderr, plain.Serve(plainLn))
				os.Exit(1)
			}()
		}
		fmt.Fprintln(os.Stderr, srv.ServeTLS(ln, "", ""))
	} else {
		fmt.Fprintln(os.Stderr, srv.Serve(ln))
	}
	os.Exit(1)
}
