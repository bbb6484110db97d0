// Streaming load generator for the benchmark: C concurrent SSE streams, per-event delay.
//
//	sseload -url http://127.0.0.1:P/chat/completions -token sk-... -c 1000 -rounds 3 \
//	        -events 50 -interval 50 [-ramp 1000] [-deadline 300] [-ca ca.pem]
//
// -ca: trust this PEM CA for an https:// URL (the bench upstream hit directly over TLS).
// Each of the C workers runs -rounds streams one after the other (keep-alive). A stream is a POST
// with "stream": true and the headers X-Bench-Events / X-Bench-Interval-Ms, which the bench
// upstream obeys; every event carries "t_sent" (unix seconds when the upstream wrote it). For each
// event the delay is arrival time - t_sent; time to first event is measured from the request.
// Workers start spread evenly over -ramp milliseconds (so the streams are not all in phase).
// A stream fails on any error, a non-200 status, a missing event or a missing [DONE].
// Prints one JSON object; exits by itself by -deadline seconds. Standard library only.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"
)

type result struct {
	delays []float64 // ms
	ttfe   []float64 // ms
	ok     int
	failed int
	errors map[string]int
}

func pct(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p/100*float64(len(sorted))+0.5) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return sorted[i]
}

func summary(v []float64) map[string]float64 {
	sort.Float64s(v)
	out := map[string]float64{"n": float64(len(v))}
	if len(v) > 0 {
		out["p50"], out["p90"], out["p99"], out["max"] = pct(v, 50), pct(v, 90), pct(v, 99), v[len(v)-1]
	}
	return out
}

var tSent = []byte(`"t_sent":`)

func stream(ctx context.Context, client *http.Client, url, token string, body []byte, events, interval int, res *result) error {
	req, err := http.NewRequestWithContext(ctx, "POST", url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("X-Bench-Events", strconv.Itoa(events))
	req.Header.Set("X-Bench-Interval-Ms", strconv.Itoa(interval))
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		io.Copy(io.Discard, resp.Body)
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	reader := bufio.NewReaderSize(resp.Body, 16384)
	got, done := 0, false
	for {
		line, err := reader.ReadSlice('\n')
		if len(line) > 6 && bytes.HasPrefix(line, []byte("data: ")) {
			now := time.Now()
			if bytes.HasPrefix(line[6:], []byte("[DONE]")) {
				done = true
			} else if i := bytes.Index(line, tSent); i >= 0 {
				rest := line[i+len(tSent):]
				j := bytes.IndexAny(rest, ",}")
				sent, perr := strconv.ParseFloat(string(bytes.TrimSpace(rest[:max(j, 0)])), 64)
				if j < 0 || perr != nil {
					return fmt.Errorf("bad t_sent")
				}
				if got == 0 {
					res.ttfe = append(res.ttfe, float64(now.Sub(start).Microseconds())/1000)
				}
				res.delays = append(res.delays, (float64(now.UnixNano())/1e9-sent)*1000)
				got++
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil && err != bufio.ErrBufferFull {
			return err
		}
	}
	if got != events || !done {
		return fmt.Errorf("incomplete stream (%d of %d events, done=%v)", got, events, done)
	}
	return nil
}

func max(a, b int) int {
	if a > b {
		return a
	}
	return b
}

func main() {
	url := flag.String("url", "", "stream URL (POST)")
	token := flag.String("token", "", "client token")
	conc := flag.Int("c", 100, "concurrent streams")
	rounds := flag.Int("rounds", 1, "streams per worker, one after the other")
	events := flag.Int("events", 50, "events per stream")
	interval := flag.Int("interval", 50, "milliseconds between events")
	ramp := flag.Int("ramp", 1000, "spread the workers' starts over this many milliseconds")
	deadline := flag.Int("deadline", 0, "stop after this many seconds (0 = expected duration + 60)")
	caFile := flag.String("ca", "", "PEM CA to trust for https:// (default: the system's)")
	flag.Parse()
	var tlsConfig *tls.Config
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		pool := x509.NewCertPool()
		if err != nil || !pool.AppendCertsFromPEM(pem) {
			fmt.Fprintln(os.Stderr, "sseload: cannot use -ca", *caFile, err)
			os.Exit(2)
		}
		tlsConfig = &tls.Config{RootCAs: pool, NextProtos: []string{"http/1.1"}}
	}
	if *deadline <= 0 {
		*deadline = *ramp/1000 + *rounds**events**interval/1000 + 60
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(*deadline)*time.Second)
	defer cancel()
	client := &http.Client{Transport: &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost: *conc,
		DisableCompression:  true,
		TLSClientConfig:     tlsConfig,
		TLSHandshakeTimeout: 30 * time.Second,
	}}
	body := []byte(`{"model":"bench-model","stream":true,"messages":[{"role":"user","content":"Say something."}]}`)
	results := make([]result, *conc)
	var wg sync.WaitGroup
	begin := time.Now()
	for w := 0; w < *conc; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			res := &results[w]
			res.errors = map[string]int{}
			time.Sleep(time.Duration(*ramp) * time.Millisecond * time.Duration(w) / time.Duration(*conc))
			for r := 0; r < *rounds; r++ {
				if err := stream(ctx, client, *url, *token, body, *events, *interval, res); err != nil {
					res.failed++
					res.errors[err.Error()]++
				} else {
					res.ok++
				}
			}
		}(w)
	}
	wg.Wait()
	var delays, ttfe []float64
	errors := map[string]int{}
	ok, failed := 0, 0
	for _, r := range results {
		delays, ttfe = append(delays, r.delays...), append(ttfe, r.ttfe...)
		ok, failed = ok+r.ok, failed+r.failed
		for k, v := range r.errors {
			if len(errors) < 20 || errors[k] > 0 {
				errors[k] += v
			}
		}
	}
	var usage syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	cpu := float64(usage.Utime.Nano()+usage.Stime.Nano()) / 1e9
	out, _ := json.Marshal(map[string]interface{}{
		"streams": *conc * *rounds, "ok": ok, "failed": failed, "errors": errors,
		"events": len(delays), "events_expected": *conc * *rounds * *events,
		"ttfe_ms": summary(ttfe), "delay_ms": summary(delays),
		"wall_s": time.Since(begin).Seconds(), "cpu_s": cpu,
	})
	fmt.Println(string(out))
	if ctx.Err() != nil {
		os.Exit(3)
	}
}
