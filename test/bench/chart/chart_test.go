package chart

import (
	"bytes"
	"image"
	"image/color"
	"image/png"
	"os"
	"path/filepath"
	"testing"
)

func samplePanels() []Panel {
	return []Panel{
		{
			Title:    "HTTP requests/s (ratio to direct)",
			Unit:     "x",
			Ref:      1,
			RefLabel: "direct",
			Bars: []Bar{
				{Label: "tether (XDP)", Value: 0.97, Err: [2]float64{0.95, 0.99}, Highlight: true},
				{Label: "tether (splice)", Value: 0.88, Err: [2]float64{0.85, 0.9}, Highlight: true},
				{Label: "IPVS", Value: 0.93, Err: [2]float64{0.9, 0.95}},
				{Label: "HAProxy", Value: 0.61, Err: [2]float64{0.58, 0.64}},
				{Label: "nginx", Value: 0.55, Err: [2]float64{0.5, 0.57}},
				{Label: "Envoy", Value: 0.42, Err: [2]float64{0.4, 0.45}},
				{Label: "Traefik", Value: 0.31, Err: [2]float64{0.29, 0.33}},
			},
		},
		{
			Title: "UDP forwarding rate",
			Unit:  " Mpps",
			Bars: []Bar{
				{Label: "tether (XDP)", Value: 14.2, Highlight: true},
				{Label: "tether (splice)", Note: "n/a (TCP only)", Highlight: true},
				{Label: "IPVS", Value: 2.35},
				{Label: "HAProxy", Note: "n/a"},
				{Label: "nginx", Value: 0.412},
				{Label: "Envoy", Value: 0.287},
				{Label: "Traefik", Value: 0.0953, Note: "1 core"},
			},
		},
		{
			Title:    "p99 latency at 50k req/s",
			Unit:     " µs",
			Ref:      180,
			RefLabel: "direct",
			Bars: []Bar{
				{Label: "tether (XDP)", Value: 186, Err: [2]float64{181, 193}, Highlight: true},
				{Label: "tether (splice)", Value: 241, Err: [2]float64{230, 260}, Highlight: true},
				{Label: "IPVS", Value: 198, Err: [2]float64{190, 205}},
				{Label: "HAProxy", Value: 412, Err: [2]float64{380, 450}},
				{Label: "nginx", Value: 530, Err: [2]float64{480, 601}},
				{Label: "Envoy", Value: 1240, Err: [2]float64{1100, 1420}},
				{Label: "Traefik", Value: 1870, Err: [2]float64{1700, 2050}},
			},
		},
	}
}

const sampleHeading = "tether vs. other load balancers (median of 5 runs, whiskers: min–max)"

func render(t *testing.T, panels []Panel, width int) (*image.RGBA, []byte) {
	t.Helper()
	b, err := Render(sampleHeading, panels, width)
	if err != nil {
		t.Fatalf("Render: %v", err)
	}
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("decode PNG: %v", err)
	}
	rgba := image.NewRGBA(img.Bounds())
	for y := img.Bounds().Min.Y; y < img.Bounds().Max.Y; y++ {
		for x := img.Bounds().Min.X; x < img.Bounds().Max.X; x++ {
			rgba.Set(x, y, img.At(x, y))
		}
	}
	return rgba, b
}

func same(c color.Color, want color.RGBA) bool {
	r, g, b, a := c.RGBA()
	wr, wg, wb, wa := want.RGBA()
	return r == wr && g == wg && b == wb && a == wa
}

// barLengths finds the bars drawn in colours cs, top to bottom: a bar is a run
// of consecutive pixel rows with such pixels, and its length is the largest
// number of such pixels in one of its rows.
func barLengths(img *image.RGBA, cs ...color.RGBA) []int {
	var bars []int
	in := false
	b := img.Bounds()
	for y := b.Min.Y; y < b.Max.Y; y++ {
		n := 0
		for x := b.Min.X; x < b.Max.X; x++ {
			for _, c := range cs {
				if same(img.At(x, y), c) {
					n++
				}
			}
		}
		switch {
		case n > 0 && !in:
			bars = append(bars, n)
			in = true
		case n > 0:
			bars[len(bars)-1] = max(bars[len(bars)-1], n)
		default:
			in = false
		}
	}
	return bars
}

func TestRender(t *testing.T) {
	panels := samplePanels()
	const width = 760
	img, b := render(t, panels, width)

	if path := os.Getenv("CHART_SAMPLE"); path != "" {
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
	} else if err := os.WriteFile(filepath.Join(t.TempDir(), "sample.png"), b, 0o644); err != nil {
		t.Fatal(err)
	}

	// Size: the requested width, and a height that fits 3 panels of 7 rows.
	if got := img.Bounds().Dx(); got != width {
		t.Errorf("width = %d, want %d", got, width)
	}
	if h := img.Bounds().Dy(); h < 3*7*rowHeight || h > 1000 {
		t.Errorf("height = %d, want between %d and 1000", h, 3*7*rowHeight)
	}
	if !same(img.At(0, 0), color.RGBA{0xff, 0xff, 0xff, 0xff}) {
		t.Errorf("background = %v, want white", img.At(0, 0))
	}

	// Both bar colours appear.
	if n := barLengths(img, HighlightColor); len(n) == 0 {
		t.Error("no highlighted bar found")
	}
	if n := barLengths(img, BarColor); len(n) == 0 {
		t.Error("no normal bar found")
	}

	// Bars: 7 + 5 + 7 (two rows in the second panel have no value).
	lens := barLengths(img, BarColor, HighlightColor)
	if len(lens) != 19 {
		t.Fatalf("found %d bars, want 19: %v", len(lens), lens)
	}
	// In each panel, a larger value draws a longer bar.
	check := func(name string, vals []float64, lens []int) {
		t.Helper()
		for i := range vals {
			for j := range vals {
				if vals[i] > vals[j] && lens[i] <= lens[j] {
					t.Errorf("%s: value %v has bar length %d, value %v has %d",
						name, vals[i], lens[i], vals[j], lens[j])
				}
			}
		}
	}
	values := func(p Panel) []float64 {
		var v []float64
		for _, b := range p.Bars {
			if b.Value > 0 {
				v = append(v, b.Value)
			}
		}
		return v
	}
	check("panel 0", values(panels[0]), lens[0:7])
	check("panel 1", values(panels[1]), lens[7:12])
	check("panel 2", values(panels[2]), lens[12:19])

	// The longest bar in a panel without Ref or whiskers spans the bar area;
	// the others are proportional to it within a pixel or two.
	p1 := values(panels[1])
	for i, v := range p1 {
		want := v / p1[0] * float64(lens[7])
		if d := float64(lens[7+i]) - want; d < -2 || d > 2 {
			t.Errorf("panel 1 bar %d: length %d, want about %.1f", i, lens[7+i], want)
		}
	}

	// Deterministic.
	b2, err := Render(sampleHeading, samplePanels(), width)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, b2) {
		t.Error("two calls with the same input gave different PNGs")
	}
}

func TestRenderGrid(t *testing.T) {
	panels := append(samplePanels(), samplePanels()[1])
	img, b := render(t, panels, 1200)
	if path := os.Getenv("CHART_SAMPLE_GRID"); path != "" {
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	single, _ := render(t, panels[:3], 1200)
	if img.Bounds().Dy() >= single.Bounds().Dy() {
		t.Errorf("grid of 4 panels is %d high, not less than 3 stacked panels (%d)",
			img.Bounds().Dy(), single.Bounds().Dy())
	}
	if n := len(barLengths(img, BarColor, HighlightColor)); n < 7 {
		t.Errorf("found %d bars in the grid", n)
	}
}

func TestRenderErrors(t *testing.T) {
	for name, tc := range map[string]struct {
		panels []Panel
		width  int
	}{
		"nil panels":   {nil, 600},
		"empty panels": {[]Panel{}, 600},
		"no bars":      {[]Panel{{Title: "x"}}, 600},
		"narrow":       {samplePanels(), 10},
		"negative":     {[]Panel{{Bars: []Bar{{Label: "a", Value: -1}}}}, 600},
	} {
		if _, err := Render("h", tc.panels, tc.width); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestFormatValue(t *testing.T) {
	for v, want := range map[float64]string{
		0:         "0",
		0.0123456: "0.0123",
		0.97:      "0.970",
		1:         "1.00",
		1.2345:    "1.23",
		9.996:     "10.0",
		14.2:      "14.2",
		99.96:     "100",
		123.4:     "123",
		1234:      "1,230",
		12345:     "12,300",
		1234567:   "1,230,000",
		-2.5:      "-2.50",
	} {
		if got := FormatValue(v); got != want {
			t.Errorf("FormatValue(%v) = %q, want %q", v, got, want)
		}
	}
}

func TestRenderEdgeCases(t *testing.T) {
	panels := []Panel{
		{Title: "all missing", Bars: []Bar{{Label: "a", Note: "n/a"}, {Label: "b"}}},
		{
			Title: "a very long title that does not fit into the panel at all, so it is shortened with an ellipsis",
			Bars: []Bar{
				{Label: "a balancer with an absurdly long name that gets shortened", Value: 3, Highlight: true},
				{Label: "b", Value: 1e9, Err: [2]float64{2e9, 5e8}},
			},
			Ref: 1,
		},
	}
	img, b := render(t, panels, 300)
	if path := os.Getenv("CHART_SAMPLE_EDGE"); path != "" {
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got := img.Bounds().Dx(); got != 300 {
		t.Errorf("width = %d, want 300", got)
	}
	// The tiny value still shows (the Ref line at the same x may split it).
	if n := len(barLengths(img, HighlightColor)); n == 0 {
		t.Error("the highlighted bar is not drawn")
	}
}
